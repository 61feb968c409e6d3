"""`python -m rnnlm …` is the `rnnlm` command (torchrun and other launchers start modules this way)."""

from rnnlm.cli import main

main(prog_name="rnnlm")
