"""``flashinfer.jit.core``: the JIT logger.

:data:`logger` is the standard-library logger ``"flashtile.jit"``. flashtile logs nothing to it
today (Triton reports its own compilation); it exists so that callers can import it and set its
level, as SGLang does for ``flashinfer.jit.core.logger``.
"""

import logging

__all__ = ["logger"]

logger: logging.Logger = logging.getLogger("flashtile.jit")
