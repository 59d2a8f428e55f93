"""Bodies for the cluster registry: register a cluster, replace it (PUT), update it (PATCH)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from ._common import FullMatch, GatewaySchema, HttpsUrl, LabelMap, dns_label, one_of, patch_schema, text, uuid

__all__ = [
    "ENVIRONMENTS",
    "PROVIDERS",
    "ClusterCreateSchema",
    "ClusterCredentialsSchema",
    "ClusterUpdateSchema",
]

PROVIDERS = (
    "eks", "gke", "aks", "openshift", "rancher", "kind", "k3s", "k0s", "minikube", "microk8s",
    "talos", "kubeadm", "other",
)  # fmt: skip
ENVIRONMENTS = ("production", "staging", "development", "testing", "qa", "sandbox", "preview")
CREDENTIAL_TYPES = ("token", "client_certificate")

MAX_SECRET = 16 * 1024
_PEM = FullMatch(
    r"^-----BEGIN [A-Z0-9 ]+-----[\s\S]+-----END [A-Z0-9 ]+-----\s*$", error="Must be PEM-encoded."
)
_REGION = FullMatch(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", error="Must be lowercase letters, digits and '-', e.g. eu-west-1."
)
_K8S_VERSION = FullMatch(
    r"^v?[0-9]+\.[0-9]+(\.[0-9]+)?([-+][0-9A-Za-z.+-]+)?$", error="Must be a version such as v1.30.2."
)


def _pem(**kwargs: Any) -> fields.String:
    return fields.String(validate=[validate.Length(max=MAX_SECRET), _PEM], **kwargs)


class ClusterCredentialsSchema(GatewaySchema):
    """How the registry reaches the API server: a bearer token or a client certificate."""

    type = one_of(CREDENTIAL_TYPES, required=True)
    token = text(MAX_SECRET, min_length=1)
    client_certificate = _pem()
    client_key = _pem()
    ca_certificate = _pem()

    # Also runs when a field has an error, so that every problem is reported at once.
    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def _fields_match_type(self, data: Mapping[str, Any], original: Any, **kwargs: Any) -> None:
        needed = {"token": ("token",), "client_certificate": ("client_certificate", "client_key")}
        kind = data.get("type")
        if kind not in needed or not isinstance(original, Mapping):
            return
        errors: dict[str, list[str]] = {}
        for name in needed[kind]:
            if name not in original:
                errors[name] = ["Missing data for required field."]
        for other_kind, names in needed.items():
            if other_kind != kind:
                for name in names:
                    if name in original:
                        errors[name] = [f"Not allowed when type is {kind!r}."]
        if errors:
            raise ValidationError(errors)


class ClusterCreateSchema(GatewaySchema):
    """A cluster to register; PUT takes the same full representation."""

    name = dns_label(required=True)
    cluster_id = uuid()
    display_name = text(256, min_length=1)
    description = text(2000)
    api_server_url = HttpsUrl(required=True)
    provider = one_of(PROVIDERS, required=True)
    environment = one_of(ENVIRONMENTS, required=True)
    region = fields.String(validate=[validate.Length(min=1, max=64), _REGION])
    kubernetes_version = fields.String(validate=[validate.Length(max=64), _K8S_VERSION])
    labels = LabelMap()
    credentials = fields.Nested(ClusterCredentialsSchema)


ClusterUpdateSchema = patch_schema(ClusterCreateSchema, "ClusterUpdateSchema")
