"""KubeRay manifests, the ``ray up`` config and the container image of replaceme."""

from cluster.manifests import IMAGE, iter_containers, load_manifest, render_rayjob

__all__ = ["IMAGE", "iter_containers", "load_manifest", "render_rayjob"]
