"""MLServer runtime for the inference benchmark: a TorchScript module, FP32 in, FP32 out.

Copied into the MLServer model folder and imported by MLServer, in MLServer's own virtual
environment (`tests.bench.mlserver_reference`); nothing in the project imports it.
"""
import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class TorchScriptRuntime(MLModel):
    """Loads `model.pt` with torch.jit (an opaque TorchScript file, no pickle)."""

    async def load(self) -> bool:
        torch.set_num_threads(1)
        self._module = torch.jit.load(await get_model_uri(self._settings))
        self._module.eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        features = NumpyCodec.decode_input(payload.inputs[0])
        with torch.inference_mode():
            logits = self._module(torch.from_numpy(np.ascontiguousarray(features, np.float32))).numpy()
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("logits", logits)])
