"""m1_hybrid: the one M1 hybrid model definition, its conversion from a Llama/Qwen2 teacher, the
import of released M1 checkpoints, and the ``m1`` command line.

Importing the package registers ``m1_hybrid`` with ``AutoConfig`` and ``AutoModelForCausalLM``.

Example::

    >>> from transformers import AutoConfig
    >>> import m1_hybrid
    >>> AutoConfig.for_model("m1_hybrid", num_hidden_layers=2, attn_layers=[0]).layers_block_type
    ['attention', 'mamba']
"""

from transformers import AutoConfig
from transformers import AutoModelForCausalLM

from .configuration_m1 import M1HybridConfig
from .modeling_m1 import M1HybridForCausalLM
from .modeling_m1 import M1HybridModel

AutoConfig.register(M1HybridConfig.model_type, M1HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(M1HybridConfig, M1HybridForCausalLM, exist_ok=True)

__all__ = ["M1HybridConfig", "M1HybridForCausalLM", "M1HybridModel"]
