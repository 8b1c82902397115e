from megadiff.parallel.env import expand_nodelist, read_launch_env


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node5") == ["node5"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_torchrun_env_wins():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "9",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "8",
    }
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3,
        4,
        1,
        "h",
        9,
        "torchrun",
    )


def test_slurm_env():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[12-13]",
        "SLURM_JOB_ID": "777",
    }
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (
        5,
        8,
        1,
        "gpu12",
        "slurm",
    )
    assert e.master_port == 20000 + 777


def test_single_process_default():
    e = read_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")
