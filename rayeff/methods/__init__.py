"""Fine-tuning methods: one module each, each registering one `MethodDefinition` (rayeff/methods/registry.py says
what a definition holds). To add a method, write `rayeff/methods/<name>.py` with its config and build, call
`register_method` at its end, and import it below.
"""

from rayeff.methods.registry import (  # noqa: F401  (the package's interface)
    METHODS,
    MethodConfig,
    MethodDefinition,
    get_method,
    method_config_from_dict,
    register_method,
    trainable_parameter_count,
)

from rayeff.methods import adazeta, full, lora, mezo, moe, read  # noqa: E402,F401,I001  (registration)
