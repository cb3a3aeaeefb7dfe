"""Compressor tests: steps on real torch and onnxruntime models, the service over real gRPC."""
