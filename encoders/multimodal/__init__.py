"""Models that put two modalities into one space, one encoder serving two columns; registered by
name, nothing heavy is imported here.

- ``hf-clip`` (clip.py): CLIP text and images.
- ``hf-clap`` (clap.py): CLAP text and audio.
Each reuses its modalities' prepare stages (encoders/text/tokenize.py, encoders/image/prepare.py,
encoders/audio/prepare.py) and on-device helpers.
"""

from encoders.core.registry import register_family

register_family("hf-clip", "encoders.multimodal.clip:HFClipFamily", model_types=("clip",))
register_family("hf-clap", "encoders.multimodal.clap:HFClapFamily", model_types=("clap",))
