"""`python -m rnnlm ...`, which is how torchrun starts each rank: `torchrun ... -m rnnlm train ...`."""

from .cli import main

main(prog_name="rnnlm")
