# The two commands that set everything up on a fresh machine are bin/demo and bin/test (they need
# nothing but bash; as root they install what is missing). These targets are the same, for habit.
.PHONY: demo test slow bench

demo:
	bin/demo

test:
	bin/test

slow:
	bin/test -m slow

bench:
	bash -c 'source bin/setup.sh && need_venv' && .venv/bin/python bench/bench_core.py
