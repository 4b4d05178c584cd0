"""Load, adopt, reload, refuse a mismatched reload, unload: the instance
lifecycle, with map contents kept across all but the last."""

from __future__ import annotations

import ipaddress
import os

import pytest

from loader import abi, libbpf, tables
from loader.compile import BuildOptions
from loader.errors import PinError
from loader.instance import HOOKS, Datapath
from tests.conftest import require_root


@pytest.fixture
def small_instance():
    require_root()
    dp = Datapath(f"dptest_life_{os.getpid()}")
    try:
        yield dp
    finally:
        if os.path.isdir(dp.pin_dir):
            dp.unload()


def test_adopt_and_reload_keep_maps_and_options(small_instance):
    dp = small_instance
    assert dp.load(BuildOptions(pin_dir=dp.pin_dir, ct_max=1024)) == "loaded"
    tables.sync_identities(dp, {"10.9.9.0/24": 777})
    ids = {h: dp.program_info(h)["id"] for h in HOOKS}

    again = Datapath(dp.instance)
    assert again.load() == "adopted"           # recorded options, nothing compiled
    assert {h: again.program_info(h)["id"] for h in HOOKS} == ids
    assert again.ct.max_entries == 1024

    # A map pin of another layout version (as a reload across versions leaves
    # behind) serves no program after the reload: it is removed.
    old_layout = os.path.join(dp.pin_dir, f"dp_ct_v{abi.ABI_VERSION - 1}")
    libbpf.obj_pin(again.ct.fd, old_layout)
    assert again.load(reload=True) == "reloaded"
    assert not os.path.exists(old_layout)
    assert os.path.exists(os.path.join(dp.pin_dir, f"dp_ct_v{abi.ABI_VERSION}"))
    new_ids = {h: again.program_info(h)["id"] for h in HOOKS}
    assert all(new_ids[h] != ids[h] for h in HOOKS)
    assert tables.read_identities(again) == {ipaddress.ip_network("10.9.9.0/24"): 777}
    assert again.ct.max_entries == 1024
    again.close()

    with pytest.raises(PinError, match="holds 1024 entries, this load asks for 262144"):
        Datapath(dp.instance).load(BuildOptions(pin_dir=dp.pin_dir), reload=True)
    assert Datapath(dp.instance).is_loaded()   # the refused reload changed nothing

    dp.unload()
    assert not os.path.exists(dp.pin_dir)
    assert not os.path.exists(dp.state_path)
