"""A model family that only an entry point names (tests/test_extension_api.py): imported when a converted config of
it is read, by no test directly."""
from transformers import AutoConfig, PreTrainedConfig


class EntryConfig(PreTrainedConfig):
    model_type = 'mom_wrap_test_entry'


AutoConfig.register(EntryConfig.model_type, EntryConfig, exist_ok=True)
