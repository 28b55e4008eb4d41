"""Library chatter off: progress bars and info logs of datasets and transformers would bury rayeff's own one-line
messages and progress display. Called by the command line and by every worker, never at import."""

from __future__ import annotations

import os
import sys
import warnings

# Each library reads its variable when first imported; setdefault leaves a user's own choice in place.
QUIET_ENVIRONMENT = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",   # transformers' progress bars follow huggingface_hub's switch
    "TRANSFORMERS_VERBOSITY": "error",
}


def quiet_libraries() -> None:
    """Through the libraries' environment variables, so that a command that never loads them (`rayeff jobs list`)
    does not spend seconds importing them; a library already imported is told directly."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from torch/transformers
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        logging = sys.modules["transformers"].utils.logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
