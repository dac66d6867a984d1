"""The engine: the streaming runner (read → decompose → method → write, overlapped), its stages,
torch.distributed ranks, output folders as transactions (lock, temporary name, journal, idempotent
finish, safe --overwrite), fault injection for tests and the progress-reporter protocol.

May import surgeon.format, surgeon.linalg, surgeon.model and surgeon.methods; never runtime or commands.
"""
