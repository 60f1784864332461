"""Generated protobuf and gRPC code for proto/migrator/wire (see scripts/gen_proto.py)."""
