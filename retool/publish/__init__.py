"""Publish artifacts to a Triton model repository (a local folder or an fsspec URL such as s3://)."""
from __future__ import annotations

from typing import Mapping

from retool.publish.repository import Finding, PublishResult, Repository, open_repo

__all__ = ["publish", "open_repo", "PublishResult", "Repository", "Finding"]


def publish(artifact, repo_url, name: str, *, version="auto", report=None, force: bool = False,
            max_regression=None, alias: str | None = None, max_batch_size: int | None = None,
            instance_count: int = 1, storage_options: Mapping | None = None, republish: bool = False,
            serving_profile=None, samples: bool = True, samples_reference=None, sign_key=None,
            sign_cert=None) -> PublishResult:
    """Publish ``artifact`` (an .onnx path or a ModelArtifact) as a new version of ``name`` in ``repo_url``.

    ``report`` is a report.json path or a Report (default: the artifact's sidecar report when
    its sha256 matches). A failing report, or a regression against the latest (and production)
    version beyond ``max_regression`` ("latency=20%,size=10%,cosine=0.01" by default, "off"),
    raises PublishError unless ``force``; a forced publish is recorded in the manifest. So does
    a report about another file (sha256 differs). A file identical to the latest version makes
    no new version (``result.unchanged``) unless ``republish`` or an explicit ``version``.
    ``sign_key`` (and ``sign_cert``): PEM files; the version and the model's config.sig are signed
    with OpenSSF model-signing (see retool.publish.signing).
    """
    from retool.publish.signing import signer

    return open_repo(repo_url, storage_options, signer(sign_key, sign_cert)).publish(
        artifact, name, version=version, report=report, force=force, max_regression=max_regression,
        alias=alias, max_batch_size=max_batch_size, instance_count=instance_count, republish=republish,
        serving_profile=serving_profile, samples=samples, samples_reference=samples_reference)
