# On a GPU machine (sourced): the emulated hosts' tools from the carried .deb files
# (benchmarks/gpu/rig-debs.sh made them here), unpacked OUTSIDE / so the machine's own
# files are never touched:
#   source benchmarks/gpu/rig-tools.sh [DEBS_DIR=.rig-debs] [PREFIX=/tmp/rigroot]
# Each tool (ip, sshd, ssh-keygen, pgrep, ps) gets a wrapper in PREFIX/wrap that runs it
# through the machine's dynamic loader with --library-path PREFIX's libraries: the
# libraries apply to that program alone, never to what it starts (`ip netns exec unshare
# ...`, the shells sshd opens), unlike LD_LIBRARY_PATH. sshd runs with -r (no re-exec: a
# re-exec would start the binary without the loader). PREFIX/wrap goes first on PATH.
# The carried wheels (paramiko's closure) go to PREFIX/py, last on PYTHONPATH.
_rig_debs=${1:-.rig-debs}
_rig_prefix=${2:-/tmp/rigroot}
if [ ! -x "$_rig_prefix/wrap/sshd" ]; then
  ls "$_rig_debs"/*.deb >/dev/null || { echo "rig-tools.sh: no .deb files in $_rig_debs (carry it)" >&2; return 1; }
  mkdir -p "$_rig_prefix/wrap"
  for _deb in "$_rig_debs"/*.deb; do
    if command -v dpkg-deb >/dev/null; then dpkg-deb -x "$_deb" "$_rig_prefix" || return 1
    else  # no dpkg: a .deb is an ar archive holding data.tar.*; Python reads both
      python3 - "$_deb" "$_rig_prefix" <<'PY' || return 1
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
pos = 8  # after "!<arch>\n"
while pos < len(data):
    name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
    if name.startswith("data.tar"):
        tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size])).extractall(sys.argv[2])
    pos += 60 + size + (size % 2)
PY
    fi
  done
  _rig_ldso=$(ls /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 2>/dev/null | head -1)
  _rig_libs="$_rig_prefix/usr/lib/x86_64-linux-gnu:$_rig_prefix/lib/x86_64-linux-gnu"
  for _tool in usr/sbin/sshd usr/bin/ssh-keygen bin/ip sbin/ip usr/bin/ip usr/sbin/ip usr/bin/pgrep bin/ps usr/bin/ps; do
    [ -x "$_rig_prefix/$_tool" ] && [ ! -L "$_rig_prefix/$_tool" ] || continue
    _name=$(basename "$_tool")
    [ -e "$_rig_prefix/wrap/$_name" ] && continue
    _extra=; [ "$_name" = sshd ] && _extra=" -r"
    printf '#!/bin/sh\nexec %s --library-path %s %s%s "$@"\n' "$_rig_ldso" "$_rig_libs" "$_rig_prefix/$_tool" "$_extra" \
      > "$_rig_prefix/wrap/$_name"
    chmod 755 "$_rig_prefix/wrap/$_name"
  done
fi
# fleetserve's SSH library (not in the serving-stack bundle), after the bundle on PYTHONPATH.
if [ ! -f "$_rig_prefix/py/.ok" ] && ls "$_rig_debs"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target "$_rig_prefix/py" "$_rig_debs"/wheels/*.whl \
    && touch "$_rig_prefix/py/.ok" || return 1
fi
case ":${PYTHONPATH:-}:" in *":$_rig_prefix/py:"*) ;; *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$_rig_prefix/py";; esac
case ":$PATH:" in *":$_rig_prefix/wrap:"*) ;; *) export PATH="$_rig_prefix/wrap:$PATH";; esac
# The emulator's sshd, and the prefix the rig keeps visible in each emulated host's private /tmp.
export FLEETSERVE_SSHD="$_rig_prefix/wrap/sshd" FLEETSERVE_TOOLS_PREFIX="$_rig_prefix"
echo "rig tools from $_rig_prefix: $(ip -V 2>&1 | head -1); $(sshd -V 2>&1 | head -1); $(python3 -c 'import paramiko; print("paramiko", paramiko.__version__)' 2>&1 | tail -1)" >&2
unset _rig_debs _rig_prefix _rig_ldso _rig_libs _tool _name _extra _deb
