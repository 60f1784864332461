"""migrator: post-copy live migration of a guest process over userfaultfd and gRPC."""

PROTOCOL_VERSION = 4
__version__ = "0.1.0"
