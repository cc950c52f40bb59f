"""Engine layouts. Each folder is one target, registered with dcc.targets.base.register_target; the runtime, the
compiler and the CLI find them through dcc.targets.base only."""

# the registry line: the targets that ship with dcc (each a package dcc.targets.<name> that registers itself)
BUILTIN_TARGETS = ("tinychat", "qserve", "nunchaku")
