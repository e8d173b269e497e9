"""The checked-in generated modules must be exactly what protoc makes of disagg.proto."""

from pathlib import Path

from proto.generate import ROOT, generate


def test_generated_modules_match_proto(tmp_path: Path):
    (tmp_path / "proto").mkdir()
    generate(tmp_path)
    for name in ("disagg_pb2.py", "disagg_pb2.pyi", "disagg_pb2_grpc.py"):
        fresh = (tmp_path / "proto" / name).read_text()
        checked_in = (ROOT / "proto" / name).read_text()
        assert fresh == checked_in, f"proto/{name} is stale: run `make proto`"
