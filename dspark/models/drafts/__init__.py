"""Draft models: the interface, the algorithm registry, and the algorithms.

What lives here: `base` (the `Draft` protocol every algorithm satisfies, `DraftProposal`, and
the registry `DRAFT_ALGORITHMS`: name, model class, defaults, training loss, checkpoint
architecture; duplicate names are refused), `config` (`DraftConfig` and how a draft is sized
for a target), `vocab` (the shared embedding / LM head and a reduced draft vocabulary),
`dspark` (the DSpark / DFlash parallel backbone), `heads` (Markov and confidence heads),
`eagle3` (the EAGLE-3 chain), and `io` (creating, saving and loading draft directories).

Who may import it: everything from dspark.engine up. It imports dspark.models' building
blocks (batch, layers, config, checkpoint), dspark.ops and dspark.errors.
"""
from .base import DRAFT_ALGORITHMS, Draft, DraftAlgorithm, DraftProposal, draft_algorithm, register_draft_algorithm
from .config import DraftConfig, default_draft_sizes, draft_config_for_target
from .dspark import DSparkDraft
from .eagle3 import Eagle3Draft
from .io import init_draft, load_draft, save_draft
from .vocab import DraftVocab

__all__ = ["DRAFT_ALGORITHMS", "DSparkDraft", "Draft", "DraftAlgorithm", "DraftConfig", "DraftProposal", "DraftVocab",
           "Eagle3Draft", "default_draft_sizes", "draft_algorithm", "draft_config_for_target", "init_draft",
           "load_draft", "register_draft_algorithm", "save_draft"]
