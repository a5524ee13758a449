"""Boot a 2-NUMA-node Linux guest under qemu and run scripts in it (see README.md)."""
from .harness import (VMBootError, VMError, VMResult, VMSetupError, VMTimeoutError,
                      qemu_command, run_in_vm)

__all__ = ["run_in_vm", "qemu_command", "VMResult", "VMError", "VMSetupError",
           "VMBootError", "VMTimeoutError"]
