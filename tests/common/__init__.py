"""Helpers shared by hf_vl's tests: tiny configs (``tiny``) and the common model test mixin (``model_tester``)."""
