"""The gRPC contract (disagg.proto) and its generated modules.

Regenerate with `make proto`; tests/unit/proto/test_generated.py checks they match the .proto.
"""

from proto import disagg_pb2, disagg_pb2_grpc  # noqa: F401
