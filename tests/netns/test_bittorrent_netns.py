"""The BitTorrent baseline runs in the testbed: every host gets every file, staggered, from one seeder.

Job: 4 hosts × 2 files × 8 MiB at 100 Mbit/s, host i starting 0.5·i s after the first, through
opentracker, an aria2c seeder in the seed namespace and one aria2c per host (`bittorrent.run_bittorrent`).
Rules: skipped with the missing program named when aria2c, mktorrent, opentracker or curl is absent
(.ci/run does not install them); every output's sha256 is checked by the run; asserts every host
finished, the seeder sent between one copy and one per host, no aria2c or tracker outlives the swarm
and no namespace outlives the testbed.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .bittorrent import missing_tools, run_bittorrent
from .testbed import Testbed, percentile, t_min_s

HOSTS, FILES, FILE_BYTES, RATE_MBIT, STAGGER_S = 4, 2, 8 * 1024 * 1024, 100.0, 0.5


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_staggered_hosts_get_two_torrents_from_one_seeder() -> None:
    if missing := missing_tools():
        pytest.skip(f"the BitTorrent baseline needs {', '.join(missing)}")
    with Testbed(hosts=HOSTS, rate_mbit=RATE_MBIT, start_dfly=False) as bed:
        names = [bed.add_file(f"layer-{k}", FILE_BYTES)[0].rsplit("/", 1)[-1] for k in range(FILES)]
        swarm = run_bittorrent(bed, names, stagger_s=STAGGER_S, timeout_s=60)
        left = [name for name, proc in bed.procs if name != "origin" and proc.poll() is None]
        prefix = bed.prefix
    copies = swarm.seeder_upload_bytes / (FILES * FILE_BYTES)
    t_min = t_min_s(FILES * FILE_BYTES, HOSTS, RATE_MBIT, RATE_MBIT)
    figures = {
        "p50_s": round(percentile(swarm.times, 50), 3),
        "max_s": round(max(swarm.times), 3),
        "t_min_s": round(t_min, 3),
        "origin_copies": round(copies, 4),
        "cpu_s": round(swarm.cpu_s, 2),
    }
    print(json.dumps({"system": "bittorrent", **figures}))
    assert len(swarm.times) == HOSTS, figures
    assert 1.0 <= copies <= HOSTS, figures
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert not left, f"still running after the swarm: {left}"
    assert prefix not in netns, netns
