"""MaaS artifact formats, validated without pickle and without torch.

- maas-package: one safetensors file whose header metadata holds the JSON manifest
  (`maas_formats.package`, schema in `maas_formats.manifest`);
- TorchScript, ONNX and zipped Hugging Face models, checked as opaque files
  (`maas_formats.opaque`), all reachable through `validate_model_artifact`;
- GGUF files, whose header is read as data (`maas_formats.gguf`), and zipped Hugging Face
  causal LMs (`validate_causal_lm`);
- NPZ, CSV and text CSV datasets (`maas_formats.datasets`).

torch helpers live in `maas_formats.torch_io`, which is not imported here so that the registry
and inference images work without torch installed.
"""

from maas_formats._atomic import atomic_output_directory
from maas_formats.artifacts import (
    DATASET_FORMAT_BY_PROTO_NAME,
    MODEL_FORMAT_BY_PROTO_NAME,
    MODEL_FORMATS,
    SIGNATURE_REQUIRED_FORMATS,
    ArtifactFacts,
    sniff_model_format,
    validate_model_artifact,
)
from maas_formats.datasets import (
    DATASET_FORMATS,
    TEXT_CSV,
    DatasetFacts,
    load_dataset,
    load_text_dataset,
    validate_dataset,
)
from maas_formats.manifest import (
    ArchitectureSpec,
    FrameworkInfo,
    ModelManifest,
    ModelSignature,
    SignatureSpec,
    TensorSignature,
    TensorSignatureSpec,
    WeightTensorSpec,
    parse_manifest,
    signature_from_manifest,
)
from maas_formats.opaque import (
    HfTransformerInfo,
    is_causal_lm_config,
    validate_causal_lm,
    validate_hf_transformer,
    validate_onnx,
    validate_torchscript,
)
from maas_formats.package import (
    MANIFEST_METADATA_KEY,
    ModelPackageInfo,
    load_model_package,
    validate_model_package,
    write_model_package,
)
from maas_formats.safetensors_header import (
    SAFETENSORS_DTYPE_BITS,
    SafetensorsHeader,
    TensorEntry,
    read_safetensors_header,
)

__all__ = [
    "DATASET_FORMATS",
    "DATASET_FORMAT_BY_PROTO_NAME",
    "MANIFEST_METADATA_KEY",
    "MODEL_FORMATS",
    "MODEL_FORMAT_BY_PROTO_NAME",
    "SIGNATURE_REQUIRED_FORMATS",
    "SAFETENSORS_DTYPE_BITS",
    "TEXT_CSV",
    "ArchitectureSpec",
    "ArtifactFacts",
    "DatasetFacts",
    "FrameworkInfo",
    "HfTransformerInfo",
    "ModelManifest",
    "ModelPackageInfo",
    "ModelSignature",
    "SafetensorsHeader",
    "SignatureSpec",
    "TensorEntry",
    "TensorSignature",
    "TensorSignatureSpec",
    "WeightTensorSpec",
    "atomic_output_directory",
    "load_dataset",
    "load_model_package",
    "load_text_dataset",
    "parse_manifest",
    "read_safetensors_header",
    "signature_from_manifest",
    "validate_dataset",
    "validate_hf_transformer",
    "validate_causal_lm",
    "is_causal_lm_config",
    "sniff_model_format",
    "validate_model_artifact",
    "validate_model_package",
    "validate_onnx",
    "validate_torchscript",
    "write_model_package",
]
