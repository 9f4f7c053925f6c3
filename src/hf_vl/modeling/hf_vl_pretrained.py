"""The base class of every hf_vl ``PreTrainedModel``: weight init that reaches every module.

transformers 5 treats any model defined outside its own package as "custom code", and for custom code
``PreTrainedModel._initialize_weights`` skips every module without parameters of its own (it marks them initialised
without calling ``_init_weights``). That guard exists for remote models whose ``_init_weights`` writes in place and
would overwrite loaded weights. hf_vl's ``_init_weights`` methods act on container modules (``HfVlAttention``,
``HfVlMlp``, a ResNet body, DETR's model with its query embedding, ...) and only use ``transformers.initialization``,
which itself skips tensors that were loaded, so the guard is not needed and would silently leave those modules at
transformers' generic normal(0.02) init (it did for DETR: Xavier, Kaiming and the unit-variance query positions
never ran). ``tests/common/model_tester.py::test_init_reaches_every_module`` holds every architecture to this.

It also applies hf_vl's CPU memory settings (:mod:`.hf_vl_cpu_memory`) when the first model is built.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .hf_vl_cpu_memory import keep_freed_cpu_memory


class HfVlPreTrainedModel(PreTrainedModel):
    """``PreTrainedModel`` whose ``_init_weights`` is called for every module, parameters of its own or not.

    Building one also keeps freed CPU memory mapped for reuse, once per process (:mod:`.hf_vl_cpu_memory`)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        keep_freed_cpu_memory()

    def _initialize_weights(self, module, is_custom_code: bool = False):
        super()._initialize_weights(module, is_custom_code=False)


__all__ = ["HfVlPreTrainedModel"]
