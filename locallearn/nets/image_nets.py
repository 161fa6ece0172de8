"""``net.kind`` -> builder of the image encoders (the one list of image networks).

Every builder is called as ``build(width_mult, bias=..., seed=...)`` and returns a
:class:`~locallearn.nets.base.BlockNet` without read-out.
"""

from __future__ import annotations

from collections.abc import Callable

from locallearn.nets.base import BlockNet
from locallearn.nets.hebb_cnn import softhebb_cnn, softhebb_vgg6
from locallearn.nets.scff_cnn import scff_cnn, scff_vgg6
from locallearn.nets.vgg import VGG_KINDS

IMAGE_NETS: dict[str, Callable[..., BlockNet]] = {
    **VGG_KINDS,
    "softhebb": softhebb_cnn,
    "scff": scff_cnn,
    # the common network (VGG-6) with the linear part each of these rules needs
    "vgg6-softhebb": softhebb_vgg6,
    "vgg6-scff": scff_vgg6,
}
