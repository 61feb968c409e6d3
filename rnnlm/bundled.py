"""Files shipped inside the package, found the same way in a checkout, an editable install and a wheel."""

from importlib.resources import files
from pathlib import Path

# importlib.resources resolves through the import system, not through a source tree, so this holds
# wherever `rnnlm` was installed from. A wheel unpacks to a real directory, so the result is a Path.
DATA = Path(str(files("rnnlm") / "data"))

DEFAULT_MODEL = DATA / "default.pt"  # the small model `rnnlm serve` uses when given no --model
SAMPLE_TEXT = DATA / "sample.txt"  # 250 lines of WikiText-2 test, streamed by the demo
