"""The translator: a pure function from a store snapshot to the IR and every object's status.

No I/O, no clocks, no globals. `translator` calls the Gateway API translator (`gateway/`,
in phases), then Ingress (`ingress`), then the Services' frontends (`services`); they share
the route builder (`route_builder`). The typed views of the objects are in `model`, the
status it speaks in `status`. Its memo (unchanged routes' outcomes) is keyed by the
objects' content versions.
"""

from mesh.translate.config import (
    DEFAULT_CONTROLLER,
    DEFAULT_INGRESS_CONTROLLER,
    Translation,
    TranslatorConfig,
)
from mesh.translate.translator import TranslationMemo, translate

__all__ = ["DEFAULT_CONTROLLER", "DEFAULT_INGRESS_CONTROLLER", "Translation",
           "TranslationMemo", "TranslatorConfig", "translate"]
