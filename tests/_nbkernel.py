"""The kernel client the notebook tests run with (imported by name by jupyter_client)."""

from __future__ import annotations

from jupyter_client.asynchronous import AsyncKernelClient


class NoHeartbeatKernelClient(AsyncKernelClient):
    """A kernel client without the heartbeat channel.

    jupyter_client 8.10's heartbeat thread can block for ever in its ``send`` once the kernel
    has exited, and ``stop_channels`` then joins it for ever: a CI run hung there after every
    test had passed.  The kernel manager that started the kernel answers ``is_alive`` (it polls
    the process), so nbclient does not need the heartbeat."""

    def start_channels(self, shell: bool = True, iopub: bool = True, stdin: bool = True,
                       hb: bool = False, control: bool = True) -> None:
        super().start_channels(shell=shell, iopub=iopub, stdin=stdin, hb=False,
                               control=control)
