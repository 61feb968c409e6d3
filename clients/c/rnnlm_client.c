/* rnnlm_client: score text with an rnnlm daemon, one `score` request per input line.
 *
 *   rnnlm_client ENDPOINT [--stream ID] [--domain D] [--no-learn] [--timeout S]
 *                [--curve-secret-key CLIENT.key_secret --curve-server-key SERVER.key] < text
 *
 * With the two key files (as `rnnlm keygen` writes them: ZeroMQ's certificate format) the
 * connection is CURVE-encrypted and authenticated, for a daemon run with --curve-secret-key.
 *
 * It exists to show that the wire protocol (docs/protocol.md, version 1) needs nothing from Python:
 * a DEALER socket from libzmq and msgpack maps from msgpack-c are enough.
 *
 * Output, on stdout: one record per scored line, `id TAB tokens TAB loss TAB stream_perplexity`
 * (id = the 1-based input line number; numbers printed with %.17g so they read back exactly),
 * then `perplexity TAB %.6f TAB words TAB N` over the lines of this run, where N counts tokens,
 * `</s>` included, as the daemon does. Blank lines are not sent (the daemon would refuse them
 * as `empty_text`) but still count for the line numbers.
 *
 * Exit status: 0 done; 1 error reply (`error TAB code TAB message` on stderr) or a reply we
 * cannot read; 2 usage, or no reply within the timeout (default 30 s); 3 the domain belongs to
 * another member of a fleet: after the `error TAB moved` line, stderr has `owner TAB NAME TAB
 * ENDPOINT`, and running again against ENDPOINT goes on (this client does not follow redirects).
 */
#define _POSIX_C_SOURCE 200809L /* getline */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>
#include <zmq.h>

static const char *endpoint;
static int timeout_ms = 30000;

static void usage(void)
{
    fprintf(stderr, "usage: rnnlm_client ENDPOINT [--stream ID] [--domain D] [--no-learn] [--timeout S] "
                    "[--curve-secret-key FILE --curve-server-key FILE] < text\n");
    exit(2);
}

/* The Z85 text of `name = "..."` (public-key or secret-key) in a ZeroMQ certificate file, into
 * out (41 bytes). Exits with status 2 if the file or the key is missing. */
static void read_key(const char *path, const char *name, char out[41])
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "rnnlm_client: cannot read key file %s\n", path);
        exit(2);
    }
    char line[256];
    size_t n = strlen(name);
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (strncmp(p, name, n) != 0)
            continue;
        char *quote = strchr(p + n, '"');
        if (quote && strlen(quote + 1) >= 41 && quote[41] == '"') {
            memcpy(out, quote + 1, 40);
            out[40] = '\0';
            fclose(f);
            return;
        }
    }
    fclose(f);
    fprintf(stderr, "rnnlm_client: no %s in %s\n", name, path);
    exit(2);
}

/* Make sock a CURVE client of the server whose public key is in server_file. */
static void curve_client(void *sock, const char *secret_file, const char *server_file)
{
    char public_key[41], secret_key[41], server_key[41];
    read_key(secret_file, "public-key", public_key);
    read_key(secret_file, "secret-key", secret_key);
    read_key(server_file, "public-key", server_key);
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_key, 41) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, public_key, 41) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret_key, 41) != 0) {
        fprintf(stderr, "rnnlm_client: CURVE keys refused: %s\n", zmq_strerror(zmq_errno()));
        exit(2);
    }
}

static void pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* One `key: "value"` entry of a map. */
static void put_str(msgpack_packer *pk, const char *key, const char *value, size_t n)
{
    pack_str(pk, key, strlen(key));
    pack_str(pk, value, n);
}

/* Start a request map of `fields` entries, `v`, `op` and `id` among them. */
static void begin(msgpack_packer *pk, size_t fields, const char *op, int64_t id)
{
    msgpack_pack_map(pk, fields);
    pack_str(pk, "v", 1);
    msgpack_pack_int(pk, 1);
    put_str(pk, "op", op, strlen(op));
    pack_str(pk, "id", 2);
    msgpack_pack_int64(pk, id);
}

/* The value of `key` in a msgpack map, or NULL. Keys are compared byte for byte (UTF-8). */
static const msgpack_object *get(const msgpack_object *map, const char *key)
{
    size_t n = strlen(key);
    if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && memcmp(k->via.str.ptr, key, n) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

/* A number as a double: the daemon sends floats, but an integral value may come as an int. */
static int number(const msgpack_object *o, double *out)
{
    if (o == NULL)
        return 0;
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: *out = o->via.f64; return 1;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double)o->via.u64; return 1;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double)o->via.i64; return 1;
    default: return 0;
    }
}

static void bad_reply(const char *why)
{
    fprintf(stderr, "rnnlm_client: unreadable reply from %s: %s\n", endpoint, why);
    exit(1);
}

/* Send the request in `buf`, wait for its reply and return the reply map if `ok` is true.
 * The returned objects point into `frame` (msgpack-c does not copy strings), so both `frame`
 * and `reply` must live until the caller is done with them. */
static const msgpack_object *exchange(void *sock, const msgpack_sbuffer *buf, int64_t id,
                                      zmq_msg_t *frame, msgpack_unpacked *reply)
{
    if (zmq_send(sock, buf->data, buf->size, 0) < 0) {
        fprintf(stderr, "rnnlm_client: send to %s failed: %s\n", endpoint, zmq_strerror(zmq_errno()));
        exit(1);
    }
    /* A DEALER queues messages for a peer that is not there; only a poll can tell us it is gone. */
    zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&item, 1, timeout_ms) <= 0) {
        fprintf(stderr, "rnnlm_client: no reply from %s within %g s\n", endpoint, timeout_ms / 1000.0);
        exit(2);
    }
    if (zmq_msg_recv(frame, sock, 0) < 0)
        bad_reply(zmq_strerror(zmq_errno()));
    size_t off = 0;
    if (msgpack_unpack_next(reply, zmq_msg_data(frame), zmq_msg_size(frame), &off) != MSGPACK_UNPACK_SUCCESS
        || reply->data.type != MSGPACK_OBJECT_MAP)
        bad_reply("not a msgpack map");
    const msgpack_object *map = &reply->data, *rid = get(map, "id"), *ok = get(map, "ok");
    if (ok == NULL || ok->type != MSGPACK_OBJECT_BOOLEAN)
        bad_reply("no boolean 'ok'");
    /* One request is in flight at a time, so any other id means the daemon broke the contract;
     * but a request it could not read (e.g. text that is not UTF-8) is answered with id nil. */
    int same_id = rid && rid->type == MSGPACK_OBJECT_POSITIVE_INTEGER && rid->via.u64 == (uint64_t)id;
    if (!same_id && !(rid && rid->type == MSGPACK_OBJECT_NIL && !ok->via.boolean))
        bad_reply("its id is not the request's id");
    if (!ok->via.boolean) {
        const msgpack_object *err = get(map, "error"), *code = get(err, "code"), *msg = get(err, "message");
        int code_ok = code && code->type == MSGPACK_OBJECT_STR, msg_ok = msg && msg->type == MSGPACK_OBJECT_STR;
        fprintf(stderr, "error\t%.*s\t%.*s\n", code_ok ? (int)code->via.str.size : 7, code_ok ? code->via.str.ptr : "unknown",
                msg_ok ? (int)msg->via.str.size : 0, msg_ok ? msg->via.str.ptr : "");
        const msgpack_object *owner = get(err, "owner"), *where = get(err, "endpoint");
        if (code_ok && code->via.str.size == 5 && memcmp(code->via.str.ptr, "moved", 5) == 0 && owner && where
            && owner->type == MSGPACK_OBJECT_STR && where->type == MSGPACK_OBJECT_STR) {
            fprintf(stderr, "owner\t%.*s\t%.*s\n", (int)owner->via.str.size, owner->via.str.ptr,
                    (int)where->via.str.size, where->via.str.ptr);
            exit(3);
        }
        exit(1);
    }
    return map;
}

int main(int argc, char **argv)
{
    const char *stream = "default", *domain = NULL, *secret_file = NULL, *server_file = NULL;
    int learn = 1;
    if (argc < 2 || argv[1][0] == '-')
        usage();
    endpoint = argv[1];
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--no-learn") == 0)
            learn = 0;
        else if (i + 1 < argc && strcmp(argv[i], "--stream") == 0)
            stream = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--domain") == 0)
            domain = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--timeout") == 0)
            timeout_ms = (int)(atof(argv[++i]) * 1000);
        else if (i + 1 < argc && strcmp(argv[i], "--curve-secret-key") == 0)
            secret_file = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--curve-server-key") == 0)
            server_file = argv[++i];
        else
            usage();
    }
    if ((secret_file == NULL) != (server_file == NULL))
        usage(); /* the two key files go together */

    void *ctx = zmq_ctx_new(), *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0; /* on exit, drop requests a dead daemon never took instead of hanging */
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (secret_file)
        curve_client(sock, secret_file, server_file);
    if (zmq_connect(sock, endpoint) != 0) {
        fprintf(stderr, "rnnlm_client: cannot connect to %s: %s\n", endpoint, zmq_strerror(zmq_errno()));
        return 2;
    }

    msgpack_sbuffer buf;
    msgpack_packer pk;
    msgpack_unpacked reply;
    zmq_msg_t frame;
    msgpack_sbuffer_init(&buf);
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    msgpack_unpacked_init(&reply);
    zmq_msg_init(&frame);

    /* A ping first, so a wrong endpoint is reported before any text is sent. id 0: lines start at 1. */
    begin(&pk, 3, "ping", 0);
    exchange(sock, &buf, 0, &frame, &reply);

    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int64_t id = 0;
    double total_loss = 0;
    uint64_t total_tokens = 0;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        id++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (strspn(line, " \t\v\f") == (size_t)len)
            continue;
        msgpack_sbuffer_clear(&buf);
        begin(&pk, domain ? 7 : 6, "score", id);
        put_str(&pk, "stream", stream, strlen(stream));
        if (domain) /* omitted, the daemon uses "default" */
            put_str(&pk, "domain", domain, strlen(domain));
        put_str(&pk, "text", line, (size_t)len);
        pack_str(&pk, "learn", 5);
        if (learn)
            msgpack_pack_true(&pk);
        else
            msgpack_pack_false(&pk);

        const msgpack_object *map = exchange(sock, &buf, id, &frame, &reply), *tokens = get(map, "tokens");
        double loss, ppl;
        if (tokens == NULL || tokens->type != MSGPACK_OBJECT_POSITIVE_INTEGER
            || !number(get(map, "loss"), &loss) || !number(get(map, "stream_perplexity"), &ppl))
            bad_reply("a score reply without 'tokens', 'loss' or 'stream_perplexity'");
        printf("%lld\t%llu\t%.17g\t%.17g\n", (long long)id, (unsigned long long)tokens->via.u64, loss, ppl);
        total_loss += loss;
        total_tokens += tokens->via.u64;
    }
    /* Over this run's lines only: the stream may have scored text before (see stream_perplexity). */
    printf("perplexity\t%.6f\twords\t%llu\n", total_tokens ? exp(total_loss / (double)total_tokens) : NAN,
           (unsigned long long)total_tokens);

    free(line);
    zmq_msg_close(&frame);
    msgpack_unpacked_destroy(&reply);
    msgpack_sbuffer_destroy(&buf);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return ferror(stdout) ? 1 : 0;
}
