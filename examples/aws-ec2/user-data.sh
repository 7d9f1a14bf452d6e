#!/bin/bash
# EC2 user-data: install ckpt and run a training job under it as a systemd
# service, restored from and saved to S3. Explained line by line in README.md.
set -euo pipefail

CKPT_PACKAGE="${CKPT_PACKAGE:-ckpt-run[s3]}"
CKPT_REMOTE="${CKPT_REMOTE:-s3://BUCKET/PREFIX}"

case "$CKPT_REMOTE" in
  s3://BUCKET/*) echo "user-data: set CKPT_REMOTE to your s3://bucket/prefix" >&2; exit 1 ;;
esac
export DEBIAN_FRONTEND=noninteractive

# write_file MODE PATH < content: replace PATH only when the content differs,
# and remember that it changed (so a rerun with the same settings changes nothing).
changed=()
write_file() {
  local tmp
  tmp=$(mktemp "$2.XXXXXX")
  cat >"$tmp"
  chmod "$1" "$tmp"
  if cmp -s "$tmp" "$2"; then
    rm -f "$tmp"
  else
    mv -f "$tmp" "$2"
    changed+=("$2")
  fi
}

# 1. Python >= 3.11 with venv (Debian 12, Ubuntu 24.04: python3-venv).
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "user-data: ckpt needs Python >= 3.11; this image has $(python3 -V 2>&1)" >&2
  exit 1
fi
if ! python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q python3-venv
fi

# 2. ckpt in its own venv; reinstalled only when CKPT_PACKAGE changes.
if [ "$(cat /opt/ckpt/.package 2>/dev/null)" != "$CKPT_PACKAGE" ]; then
  python3 -m venv /opt/ckpt && /opt/ckpt/bin/pip install -q --upgrade "$CKPT_PACKAGE"
  printf '%s\n' "$CKPT_PACKAGE" >/opt/ckpt/.package
  changed+=(/opt/ckpt)
fi

# 3. An unprivileged user for the job, the job's code dir, the config dir.
id -u train >/dev/null 2>&1 ||
  useradd --system --user-group --home-dir /var/lib/ckpt-train --no-create-home \
    --shell /usr/sbin/nologin train
install -d -m 0755 /srv/train
install -d -m 0700 /etc/ckpt

# 4. The job. A stand-in that counts slowly; put your own train.py here
#    (or change ExecStart below). An existing file is never overwritten.
if [ ! -e /srv/train/train.py ]; then
  cat >/srv/train/train.py <<'PY'
import json, os, time
from pathlib import Path

state_file = Path(os.environ["CKPT_DIR"]) / "state.json"
step = json.loads(state_file.read_text())["step"] if state_file.exists() else 0
print(f"attempt {os.environ['CKPT_ATTEMPT']}: resuming after step {step}", flush=True)
while step < 600:
    time.sleep(60)  # one minute of "training"
    step += 1
    tmp = state_file.with_name("state.json.tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, state_file)  # atomic: never half a state file
    print(f"step {step}", flush=True)
PY
fi

# 5. Where the snapshots go. Credentials: none here, the instance profile's
#    role is found by boto through the instance metadata service.
write_file 0600 /etc/ckpt/train.env <<EOF
CKPT_REMOTE=$CKPT_REMOTE
EOF

# 6. The service: the same unit as examples/systemd/ckpt-train.service.
write_file 0644 /etc/systemd/system/ckpt-train.service <<'UNIT'
[Unit]
Description=Training job supervised by ckpt
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=1h
StartLimitBurst=5

[Service]
Type=exec
User=train
Group=train
StateDirectory=ckpt-train
WorkingDirectory=/srv/train
EnvironmentFile=/etc/ckpt/train.env
Environment=PYTHONUNBUFFERED=1
ExecStart=/opt/ckpt/bin/ckpt run --dir /var/lib/ckpt-train/checkpoints --grace 10 --flush-timeout 15 --retries 3 --preemption auto -- /opt/ckpt/bin/python /srv/train/train.py
Restart=on-failure
RestartSec=2min
RestartPreventExitStatus=1 2 78
SuccessExitStatus=79 143
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=35

[Install]
WantedBy=multi-user.target
UNIT

# 7. Start it (and at every boot), without waiting: cloud-init must finish.
was_active=$(systemctl is-active ckpt-train.service || true)
systemctl daemon-reload
systemctl enable --now --no-block ckpt-train.service
if [ "$was_active" = active ] && [ "${#changed[@]}" -gt 0 ]; then
  systemctl restart --no-block ckpt-train.service
fi
echo "user-data: ckpt-train.service started; follow it with: journalctl -u ckpt-train -f"
