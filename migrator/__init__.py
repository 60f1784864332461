"""migrator: post-copy live migration of a guest process over userfaultfd and gRPC."""

PROTOCOL_VERSION = 3
__version__ = "0.1.0"
