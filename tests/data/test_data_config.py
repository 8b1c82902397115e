import pytest

from megadiff.config import ConfigError, load_config
from megadiff.plan import resolve


def _cfg(*over):
    return resolve(load_config(None, ["data.source=mds", *over])).cfg


def test_streams_from_overrides():
    c = load_config(
        None,
        [
            "data.source=mds",
            "data.streams=[{name: t, path: /x, proportion: 2}, {name: i, path: /y, tasks: [t2i]}]",
            "data.seed=7",
        ],
    )
    assert [s.name for s in c.data.streams] == ["t", "i"]
    assert c.data.streams[1].tasks == ["t2i"] and c.data.seed == 7 and c.data.shuffle is True


def test_missing_manifest_is_named_before_start():
    with pytest.raises(ConfigError, match="/x/manifest.json' does not exist"):
        _cfg("data.streams=[{name: t, path: /x}]")


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ("data.streams=[]", "data.streams'.*at least one"),
        ("data.streams=[{name: t, path: /x, proportion: -1}]", r"streams\[0\].proportion"),
        ("data.streams=[{name: t, path: /x, proportion: 0}]", "sum to zero"),
        ("data.streams=[{name: t, path: ''}]", r"streams\[0\].path"),
        ("data.streams=[{name: t, path: /x}, {name: t, path: /y}]", "used twice"),
        ("data.streams=[{name: t, path: /x, tasks: [t2x]}]", "'t2x' is not one of"),
        ("data.streams=[{name: t, path: /x, weight: 1}]", "unknown config key"),
    ],
)
def test_bad_data_config(over, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(over)
