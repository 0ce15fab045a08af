"""Published trained weights: the table of tags (`published`), fetching into a cache (`download`) and
a restricted reader for checkpoints that official training scripts write (`safe_pickle`)."""

from __future__ import annotations

from hybridzoo.hub.download import (
                                     WeightsUnavailableError,
                                     cache_dir,
                                     cached_file,
                                     fetch_weight,
)
from hybridzoo.hub.published import (
                                     PublishedWeight,
                                     default_tag,
                                     get_weight,
                                     published_weights,
                                     register_weight,
                                     resolve_pretrained,
                                     tags_for,
)

__all__ = ["PublishedWeight", "WeightsUnavailableError", "cache_dir", "cached_file", "fetch_weight", "default_tag",
           "get_weight", "published_weights", "register_weight", "resolve_pretrained", "tags_for"]
