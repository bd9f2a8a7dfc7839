"""launch/slurm_gpu.py: the dry run, and a whole job on a simulated 2-node allocation: a fake `sbatch`
runs the batch script at once, and a fake `srun` starts its tasks as two local processes with the
variables SLURM sets, so JAX's own SLURM detection joins them. They train and write one checkpoint."""

import socket
import subprocess
import sys
import tempfile

from launch import slurm_gpu
from tests.launch.common import ROOT, checkpoint_steps, entry_args, fake_command, hosts_env

FAKE_SBATCH = r"""# sbatch --parsable SCRIPT: job $FAKE_JOB_ID runs now, as its first node would run it.
script="${@: -1}"
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script")
SLURM_JOB_ID=$FAKE_JOB_ID SLURM_JOB_NAME=$name SLURM_JOB_NUM_NODES=$nodes SLURM_NTASKS=$nodes \
  bash "$script" > "$FAKE_DIR/batch.out" 2>&1
echo "$FAKE_JOB_ID"
"""

FAKE_SRUN = r"""# srun [--options] COMMAND...: $SLURM_NTASKS tasks of COMMAND on this machine, with srun's variables;
# --output's %x, %j and %t become the job name, job id and task number.
output=/dev/stdout
while [[ "$1" == --* ]]; do case "$1" in --output=*) output="${1#--output=}";; esac; shift; done
pids=()
for i in $(seq 0 $((SLURM_NTASKS - 1))); do
  log="${output//%x/$SLURM_JOB_NAME}"; log="${log//%j/$SLURM_JOB_ID}"; log="${log//%t/$i}"
  SLURM_STEP_NODELIST=localhost SLURM_PROCID=$i SLURM_LOCALID=$i JAX_COORDINATOR_PORT=$FAKE_PORT "$@" > "$log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = slurm_gpu.main(["--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--log_dir", "/shared/logs",
                           "--code_dir", "/shared/code", "--allow-dirty", "--dry-run", "--",
                           "--config", "c.py", "--workdir", "/shared/runs/lm"])
    out = capsys.readouterr().out
    assert code == 0
    script_path = out.split("sbatch script (", 1)[1].split(")", 1)[0]
    assert subprocess.run(["bash", "-n", script_path]).returncode == 0
    for expected in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                     "#SBATCH --signal=TERM@120", f"git clone --quiet {ROOT} /shared/code/",
                     "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                     "srun --kill-on-bad-exit=1 --output=/shared/logs/%x-%j-task%t.log python3 -m jaxmodels.main",
                     f"sbatch --parsable {script_path}", "tail -f /shared/logs/lm-JOBID-task0.log",
                     "scancel --signal=TERM JOBID", "dry run: nothing was submitted"]:
        assert expected in out, expected


def test_a_two_node_job_initialises_through_slurm_trains_and_checkpoints(tmp_path):
    for name, text in [("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)]:
        fake_command(tmp_path / "bin", name, text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = hosts_env(tmp_path / "bin", 4, FAKE_JOB_ID="4242", FAKE_DIR=str(tmp_path), FAKE_PORT=str(port),
                    TMPDIR=str(tmp_path))
    workdir, logs = tmp_path / "shared" / "run", tmp_path / "logs"
    r = subprocess.run([sys.executable, "-m", "launch.slurm_gpu", "--nodes", "2", "--gpus_per_node", "1",
                        "--allow-dirty", "--python", sys.executable, "--code_dir", str(tmp_path / "code"),
                        "--log_dir", str(logs), "--", *entry_args(workdir)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    task_logs = [logs / f"run-4242-task{i}.log" for i in range(2)]
    detail = (r.stdout[-2000:] + r.stderr[-2000:] + (tmp_path / "batch.out").read_text()[-2000:]
              + "".join(p.read_text()[-2000:] for p in task_logs if p.exists()))
    assert r.returncode == 0 and "submitted job 4242" in r.stdout, detail
    assert f"tail -f {logs}/run-4242-task0.log" in r.stdout and "scancel --signal=TERM 4242" in r.stdout
    first = task_logs[0].read_text()
    assert "distributed start-up through JAX's SlurmCluster: 2 processes x 4 cpu devices = 8 devices" in first, detail
    assert checkpoint_steps(workdir) == [2], detail
