"""Conversions from (and to) the models people already have: diffusers, open_clip, transformers.

Reference libraries are imported lazily by the caller: these functions take model instances.
"""

from diffkit.interop._convert import from_diffusers as from_diffusers
from diffkit.interop._diffusers import to_diffusers as to_diffusers
from diffkit.interop._diffusers import to_diffusers_state_dict as to_diffusers_state_dict
from diffkit.interop._open_clip import from_open_clip as from_open_clip
from diffkit.interop._schedulers import ALLOWED as ALLOWED
from diffkit.interop._schedulers import SchedulerParts as SchedulerParts
from diffkit.interop._schedulers import diffusers_prediction as diffusers_prediction
from diffkit.interop._schedulers import scheduler_parts as scheduler_parts
from diffkit.interop._transformers import from_transformers as from_transformers
