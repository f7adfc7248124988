"""marpipe's TorchServe handler: the entry point named in each archive's manifest.

The work is done by the package ``marpipe_serving``, which travels beside this file in every archive
(TorchServe puts the model folder on ``sys.path``). A user handler (``serve.handler``) may import from here:
``from marpipe_handler import Service, handle``.
"""

from marpipe_serving.errors import BadRequest  # noqa: F401
from marpipe_serving.service import Service, handle  # noqa: F401
