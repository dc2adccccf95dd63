# shellcheck shell=bash
# Sourced by dom0-main.sh: the unit as shipped, under a real systemd, on this
# real dom0.  The host's systemd (252, Debian 12) boots as PID 1 of private
# namespaces (tests/systemd_box.py) sharing this dom0's /dev/xen, xenstored's
# socket and /run/pcibackd; it starts etc/pcibackd.service with every hardening
# option (a drop-in adds only what the lane itself needs, each line says why),
# and through it the daemon seizes a function by command, serves a guest whose
# driver does I/O on its interrupts, reloads, gives the function back and stops.
# Each hardening option is then checked on the running daemon as the kernel
# shows it (xenlane/sandbox.py), and the audit records tell which system calls
# the daemon tried outside the unit's SystemCallFilter= allow list
# (SystemCallLog=): none, or the filter refused them.
# Devices: LANE_SYSTEMD (default nvme: MSI-X, I/O), those of LANE_DEVICES only.
LANE_SYSTEMD=${LANE_SYSTEMD-nvme}
BOXDIR=/mnt/lane-box/box
SDPID=""
sd() { nsenter --target "$SDPID" --root --wd --mount --pid --uts --ipc --cgroup -- env SYSTEMD_COLORS=0 SYSTEMD_PAGER= "$@"; }
sctl() { timeout 300 nsenter --target "$SDPID" --root --wd --mount --pid --uts --ipc --cgroup -- \
           systemctl --no-pager --no-ask-password "$@"; }
sprop() { sctl show pcibackd.service --value --property="$1" 2>/dev/null; }
outer_pid() { # a pid of the box's pid namespace -> this namespace's (NSpid: ours first, the box's last)
  local f
  for f in /proc/[0-9]*/status; do
    awk -v want="$1" '/^NSpid:/ { if (NF == 3 && $3 == want) { split(FILENAME, p, "/"); print p[3] } exit }' "$f" 2>/dev/null
  done | head -1
}
sd_stopped() { [ "$(sprop ActiveState)" = inactive ] || [ "$(sprop ActiveState)" = failed ]; }
sd_no_daemon() { ! ps -e -o args= | grep -q '^pcibackd: '; }

systemd_prepare() { # the box's directory, its units and its config; 1 when the box cannot run here
  [ -x /lib/systemd/systemd ] || { result all systemd box INFO "skipped: no /lib/systemd/systemd on the host"; return 1; }
  mountpoint -q /sys/fs/cgroup || mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup \
    || { result all systemd box FAIL "cannot mount cgroup2"; return 1; }
  # the box's overlays need a writable directory on a filesystem of its own (not
  # under /tmp, which the box shares: the checkout may sit there)
  mkdir -p /dev/shm
  mount -t tmpfs -o mode=0700 tmpfs /mnt && mkdir -p /mnt/lane-box || { result all systemd box FAIL "no tmpfs on /mnt for the box"; return 1; }
  mkdir -p /run/pcibackd "$BOXDIR.units/pcibackd.service.d"
  cp "$UNIT" "$BOXDIR.units/pcibackd.service"
  local prefix extra=""
  prefix=$("$LANE_PY" -c 'import sys; print(sys.base_prefix)')
  # (the directories ProtectHome= hides, systemd.exec(5))
  case $prefix in /root/*|/home/*|/run/user/*) extra="ProtectHome=tmpfs
BindReadOnlyPaths=$prefix" ;; esac
  cat > "$BOXDIR.units/pcibackd.service.d/lane.conf" <<EOF
# What the Xen lane changes, and why (nothing else differs from the shipped unit).
[Service]
# Python under TCG: imports take tens of seconds (the default 90 s bound suits hardware).
TimeoutStartSec=600
# The checkout (the venv behind /usr/local/sbin/pcibackd) may sit under /tmp, which
# PrivateTmp= hides; an installed pcibackd lives in /opt/pcibackd.
BindReadOnlyPaths=$LANE_REPO
# The lane's Python may be a pyenv under /root, which ProtectHome=yes hides: then home
# directories become empty tmpfs instead, with that one path bound in.
$extra
Environment=PYTHONFAULTHANDLER=1
# Measured: a system call outside the unit's allow list goes to the audit log too (the
# filter refuses it with EPERM, which a caller might take quietly).
SystemCallLog=~@system-service landlock_create_ruleset landlock_add_rule landlock_restrict_self seccomp
EOF
  cp "$BOXDIR.units/pcibackd.service.d/lane.conf" "$OUT/pcibackd-systemd.dropin"
  # the daemon's config where the unit's daemon looks for it; its state in StateDirectory=
  { echo "# written by the Xen lane (dom0-systemd.sh)"; echo "[pcibackd]"
    echo "heartbeat_timeout = ${LANE_HEARTBEAT_TIMEOUT:-300}"; echo "boot_timeout = ${LANE_BOOT_TIMEOUT:-600}"
    echo "stuck_op_seconds = ${LANE_STUCK_OP_SECONDS:-30}"; } > /mnt/lane-box/pcibackd.toml
  cp /mnt/lane-box/pcibackd.toml "$OUT/pcibackd-systemd.toml"
  cat > /mnt/lane-box/prepare.sh <<EOF
# in the box's namespaces, before systemd: what a dom0 has at boot (proc-xen.mount)
# and what \`./dev install\` puts in place
mount -t xenfs xenfs /proc/xen
mkdir -p /etc/pcibackd
cp /mnt/lane-box/pcibackd.toml /etc/pcibackd/pcibackd.toml
ln -sf $VENV_BIN/pcibackd $VENV_BIN/pcibackctl /usr/local/sbin/
EOF
}

systemd_start() { # boot the box, start the unit: sets SDPID and DPID
  local out rc=0
  out=$(timeout 400 "$LANE_PY" "$LANE_REPO/tests/systemd_box.py" start "$BOXDIR" --timeout 300 \
          --dev xen --keep-run xenstored --keep-run pcibackd --share /tmp \
          --unit "$BOXDIR.units/pcibackd.service" --unit "$BOXDIR.units/pcibackd.service.d" \
          --prepare /mnt/lane-box/prepare.sh 2>&1) || rc=$?
  SDPID=$(echo "$out" | tail -1)
  if [ $rc != 0 ] || ! [ "$SDPID" -gt 0 ] 2>/dev/null; then
    result all systemd box FAIL "rc=$rc: $(echo "$out" | tail -5 | tr '\n' ';')"; SDPID=""; return 1
  fi
  result all systemd box PASS "systemd $(sd systemctl --version | head -1 | cut -d' ' -f2) is PID 1 of its namespaces (pid $SDPID here)"
  # the daemon's log as journald has it (priority, DOMID= and BDF= fields): the lane's log file
  sd journalctl --no-pager -f -o short-monotonic -u pcibackd.service > "$PBLOG" 2>&1 &
  JFOLLOW=$!
  log "systemctl start pcibackd.service (in the box)"
  out=$(sctl start pcibackd.service 2>&1) || rc=$?
  if [ $rc = 0 ] && [ "$(sprop ActiveState)" = active ]; then
    DPID=$(outer_pid "$(sprop MainPID)")
    result all systemd unit-start PASS "active ($(sprop SubState)), main pid $(sprop MainPID) in the box, $DPID here; STATUS=$(sprop StatusText)"
  else
    result all systemd unit-start FAIL "rc=$rc $out; $(sctl status pcibackd.service 2>&1 | tail -8 | tr '\n' ';')"; return 1
  fi
}

systemd_checks() { # each hardening option on the running daemon, the security score, warnings
  sctl show pcibackd.service > /tmp/pcibackd.show 2>&1
  cp /tmp/pcibackd.show "$OUT/pcibackd-systemd.show"
  timeout 120 "$LANE_PY" "$LANE_REPO/xenlane/sandbox.py" "$BOXDIR.units/pcibackd.service" "$DPID" "$SDPID" \
    /tmp/pcibackd.show > /tmp/sandbox.txt 2>&1 || echo "unit-sandbox FAIL sandbox.py exited $?: $(tail -1 /tmp/sandbox.txt)" >> /tmp/sandbox.txt
  while read -r check verdict detail; do
    case $verdict in PASS|FAIL) result all systemd "$check" "$verdict" "$detail" ;; *) log "sandbox.py: $check $verdict $detail" ;; esac
  done < /tmp/sandbox.txt
  sd systemd-analyze security --no-pager pcibackd.service > "$OUT/pcibackd-systemd.security" 2>&1
  result all systemd analyze-security INFO "$(grep -o 'Overall exposure level.*' "$OUT/pcibackd-systemd.security")"
  # systemd's own words about the unit: an option it could not apply is a warning there
  sd journalctl --no-pager -o cat -p warning _PID=1 > /tmp/sd-warnings.txt 2>&1
  if grep -qi 'pcibackd' /tmp/sd-warnings.txt; then result all systemd no-systemd-warning FAIL "$(grep -i pcibackd /tmp/sd-warnings.txt | head -3 | tr '\n' ';')"
  else result all systemd no-systemd-warning PASS "$(wc -l < /tmp/sd-warnings.txt) warning line(s) of systemd, none about pcibackd"; fi
}

syscall_log() { # the calls the daemon tried outside the allow list, from the audit records
  # (the box's journald reads them all; the kernel log drops most, rate-limited);
  # a "(name)" comm is systemd's own child setting the service up before exec
  sd journalctl --no-pager -o cat _TRANSPORT=audit > "$OUT/pcibackd-systemd.syscalls" 2>&1
  local calls ours
  calls=$(grep -o 'comm="[^"]*".*syscall=[0-9]*' "$OUT/pcibackd-systemd.syscalls" \
            | sed 's/^comm="\([^"]*\)".*syscall=\([0-9]*\)$/\2:\1/' | sort | uniq -c | sort -rn \
            | awk '{ printf "%s%s x%s", sep, $2, $1; sep = ", " }')
  ours=$(echo "$calls" | tr ',' '\n' | grep -v ':(' | grep -c 'x')
  if [ "$ours" = 0 ]; then result all systemd no-syscall-outside-filter PASS "syscall:comm ${calls:-none} (SystemCallLog= = the filter's complement)"
  else result all systemd no-syscall-outside-filter FAIL "refused with EPERM: syscall:comm $calls (out/pcibackd-systemd.syscalls)"; fi
}

run_systemd() {
  local devs=() dev b out rc
  for dev in $LANE_SYSTEMD; do [ -n "${BDF[$dev]:-}" ] && devs+=("$dev"); done
  [ ${#devs[@]} -gt 0 ] || { [ -z "$LANE_SYSTEMD" ] || result all systemd scenario INFO "skipped: none of '$LANE_SYSTEMD' among the devices"; return 0; }
  phase "systemd: the unit as shipped under a real systemd"
  systemd_prepare || return 0
  local keep_log=$PBLOG keep_repeat=${LANE_REPEAT_DEVS:-}
  PBLOG=$OUT/pcibackd-systemd.log
  if systemd_start; then
    for dev in "${devs[@]}"; do
      b=${BDF[$dev]}
      # seized by the daemon itself (driver binding through sysfs, in its sandbox)
      local before; before=$(driver_of "$b")
      out=$(PBCTL assignable-add "$b" 2>&1); rc=$?
      if [ $rc = 0 ] && [ "$(driver_of "$b")" = pci-stub ]; then result "$dev" systemd assignable-add PASS "$b: $out"
      else result "$dev" systemd assignable-add FAIL "rc=$rc $out; driver=$(driver_of "$b")"; fi
      # one guest; the function as the pool keeps it (the firmware's Bus Master was the first seize's)
      local bm=${BM_BOOT[$dev]:-off}
      SFX=@systemd TAG=.systemd LANE_REPEAT_DEVS="" BM_BOOT[$dev]=off
      run_pcibackd "$dev"
      SFX="" TAG="" LANE_REPEAT_DEVS=$keep_repeat BM_BOOT[$dev]=$bm
      out=$(PBCTL assignable-remove -r "$b" 2>&1); rc=$?
      if [ $rc = 0 ] && [ "$(driver_of "$b")" = "$before" ]; then result "$dev" systemd assignable-remove PASS "driver=$before again: $out"
      else result "$dev" systemd assignable-remove FAIL "rc=$rc $out; driver=$(driver_of "$b") (was $before)"; fi
    done
    # with a guest served and gone: the supervisor holds its /dev/xen files now
    systemd_checks
    phase "systemd: reload, stop"
    out=$(sctl reload pcibackd.service 2>&1); rc=$?
    if [ $rc = 0 ] && [ "$(sprop ActiveState)" = active ] && PBCTL status > /dev/null 2>&1; then
      result all systemd unit-reload PASS "active, serving; $(grep -m1 -i 'reload\|SIGHUP' "$PBLOG" | cut -c1-140)"
    else result all systemd unit-reload FAIL "rc=$rc $out; $(sprop ActiveState)"; fi
    if [ "$(sprop NRestarts)" = 0 ]; then result all systemd no-restart PASS "NRestarts=0: no crash, no watchdog kill (WatchdogSec=$(sprop WatchdogUSec))"
    else result all systemd no-restart FAIL "NRestarts=$(sprop NRestarts); $(grep -i 'watchdog\|killed\|failed' "$PBLOG" | tail -3 | tr '\n' ';')"; fi
    out=$(sctl stop pcibackd.service 2>&1); rc=$?
    if [ $rc = 0 ] && poll 30 sd_stopped; then result all systemd unit-stop PASS "$(sprop ActiveState), result $(sprop Result)"
    else result all systemd unit-stop FAIL "rc=$rc $out; $(sprop ActiveState)"; fi
    # handed over on SIGTERM: the workers (none now) and the gate go within the grace
    if poll 90 sd_no_daemon; then result all systemd nothing-left PASS "no pcibackd process after the stop"
    else result all systemd nothing-left FAIL "$(ps -e -o pid=,args= | grep 'pcibackd: ' | tr '\n' ';')"; fi
    syscall_log
  fi
  cp "$BOXDIR/console.log" "$OUT/systemd-box-console.log" 2>/dev/null
  [ -z "$SDPID" ] || sd journalctl --no-pager -o short-monotonic > "$OUT/systemd-box-journal.txt" 2>&1
  kill "${JFOLLOW:-}" 2>/dev/null
  timeout 60 "$LANE_PY" "$LANE_REPO/tests/systemd_box.py" stop "$BOXDIR" >> "$OUT/dom0.log" 2>&1
  PBLOG=$keep_log
}
