"""Several Snapfleet instances on one host: each touches only what it made.

Two daemons (different state dirs, reconciling every half second) and a
`snapfleet run` sharing daemon A's state dir, with daemon B killed and
restarted mid-job. Nobody's clone loses its namespace or veth to another's
recovery, and every job that was not killed finishes as it should.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest

from runner.api.client import ApiClient
from runner.net import NetConfig
from runner.net.config import instance_id
from runner.vm.ownership import InstanceUse
from tests.daemons import DaemonProcess, wait_state, wait_terminal

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def own_names(d: DaemonProcess) -> set[str]:
    """Namespaces and host veths carrying ``d``'s instance id."""
    net = NetConfig(instance=instance_id(d.state))
    netns = set(os.listdir(net.netns_dir)) if os.path.isdir(net.netns_dir) else set()
    links = set(os.listdir("/sys/class/net"))
    return {n for n in netns if n.startswith(net.own_netns_prefix)} | {
        n for n in links if n.startswith(net.own_veth_prefix)
    }


async def test_daemons_and_a_cli_run_leave_each_other_alone(daemon_factory: Any) -> None:
    a: DaemonProcess = daemon_factory(reconcile="0.5")
    b: DaemonProcess = daemon_factory(reconcile="0.5")
    # A CLI run on daemon A's state dir: the same instance, another process.
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner.cli", "--config", str(a.config), "run", "--",
        "sh", "-c", "echo up; sleep 20; echo still-here",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert cli.stdout is not None
    assert (await asyncio.wait_for(cli.stdout.readline(), 300)).strip() == b"up"
    cli_names = own_names(a)
    assert len(cli_names) == 2, cli_names  # its namespace and its host veth

    a.start()
    b.start()
    a.wait_for("READY=1")
    b.wait_for("READY=1")
    async with ApiClient(a.api) as api_a, ApiClient(b.api) as api_b:
        job_a = (await api_a.submit({"script": "sleep 4; echo a-done"}))["id"]
        job_b = (await api_b.submit({"script": "sleep 30"}))["id"]
        await wait_state(api_a, job_a, "running")
        await wait_state(api_b, job_b, "running")
        b_names = own_names(b)
        assert b_names, "daemon B's clone has a namespace and a veth"
        assert not b_names & cli_names

        b.kill9()  # its clone lives on, ownerless
        await asyncio.sleep(1.5)  # daemon A reconciles three times meanwhile
        assert cli_names <= own_names(a), "daemon A reclaimed the CLI run's network"
        assert b_names <= own_names(b), "daemon A reclaimed daemon B's network"

        b.start()  # B's recovery reclaims its own orphan, and only that
        b.wait_for("READY=1")
        lost = (await wait_terminal(api_b, [job_b]))[job_b]
        assert lost["state"] == "system_failure"
        assert not own_names(b)
        assert not b.vm_dirs()
        assert cli_names <= own_names(a), "daemon B's recovery touched instance A"

        done = (await wait_terminal(api_a, [job_a]))[job_a]
        assert done["state"] == "succeeded", done

    out, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err.decode()
    assert out.strip() == b"still-here"
    assert not own_names(a)
    assert a.stop() == 0
    assert b.stop() == 0


def test_the_last_process_of_an_instance_removes_its_host_table(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory()
    d.start()
    d.wait_for("READY=1")
    assert d.has_host_table()
    other = InstanceUse(d.state)  # another process of the instance (a `snapfleet run`)
    other.acquire()
    assert d.stop() == 0
    assert d.has_host_table()  # still in use: its rules keep guarding that process's VMs
    assert other.release()  # the last user now

    d.start()
    d.wait_for("READY=1")
    assert d.stop() == 0
    assert not d.has_host_table()  # nothing of the instance left on the host
