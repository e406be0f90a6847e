"""pretag: conditional pretraining with control tags (Korbak et al. 2023, "Pretraining Language Models with Human
Preferences"), as a library and a command line.

Heavy modules (torch, transformers) are imported lazily so that ``import pretag`` and ``pretag --help`` stay fast.
"""

from pretag.schema import Attribute, Schema, SchemaError, load_schema

__version__ = "0.1.0"
__all__ = ["Attribute", "Schema", "SchemaError", "load_schema", "__version__"]
