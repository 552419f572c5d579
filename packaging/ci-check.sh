#!/usr/bin/env bash
# Builds both packages, checks their contents, lints them, checks the unit, then installs the .deb on this machine,
# runs the installed binary on the installed config, upgrades over an edited config, removes and purges it, and
# checks that nothing is left behind. Run as root (CI is).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "ci-check: $*" >&2; exit 1; }

echo "-- tools"
missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v rpmlint >/dev/null || missing+=(rpmlint)
command -v rpm >/dev/null || missing+=(rpm)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v objdump >/dev/null || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo deb --version >/dev/null 2>&1 || cargo install --locked --quiet cargo-deb
cargo generate-rpm --version >/dev/null 2>&1 || cargo install --locked --quiet cargo-generate-rpm

echo "-- build"
bash packaging/build.sh
deb=$(ls target/debian/mimecast-forwarder_*.deb | head -n1)
rpmfile=$(ls target/generate-rpm/mimecast-forwarder-*.rpm | head -n1)

echo "-- glibc baseline (README promises 2.34)"
newest=$(objdump -T target/release/mimecast-forwarder | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)
echo "newest glibc symbol version: $newest"
[ "$(printf '%s\n2.34\n' "$newest" | sort -V | tail -n1)" = "2.34" ] || fail "the binary needs glibc $newest > 2.34"

echo "-- .deb contents"
deb_list=$(dpkg-deb -c "$deb")
echo "$deb_list"
for path in ./usr/bin/mimecast-forwarder ./etc/mimecast-forwarder/config.toml \
    ./usr/lib/systemd/system/mimecast-forwarder.service ./usr/share/doc/mimecast-forwarder/README.md \
    ./usr/share/doc/mimecast-forwarder/copyright; do
    grep -q " $path\$" <<<"$deb_list" || fail "$path missing from the .deb"
done
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
grep -qx /etc/mimecast-forwarder/config.toml <<<"$conffiles" || fail "config.toml is not a conffile"

echo "-- .rpm contents"
rpm_list=$(rpm -qlp "$rpmfile")
echo "$rpm_list"
for path in /usr/bin/mimecast-forwarder /etc/mimecast-forwarder/config.toml \
    /usr/lib/systemd/system/mimecast-forwarder.service /usr/share/doc/mimecast-forwarder/README.md; do
    grep -qx "$path" <<<"$rpm_list" || fail "$path missing from the .rpm"
done
grep -qx /etc/mimecast-forwarder/config.toml <<<"$(rpm -qp --configfiles "$rpmfile")" || fail "config.toml is not %config"
grep -q useradd <<<"$(rpm -qp --scripts "$rpmfile")" || fail "the .rpm does not create the user"

echo "-- lintian"
# Accepted warnings (lintian --fail-on error still fails on any error):
# - maintainer-script-calls-systemctl: deliberate; the scripts guard every call with /run/systemd/system
#   and we do not use debhelper, whose generated snippets would enable and start the unit on a fresh install.
# - no-manual-page: `--help` on each command is the manual.
# - non-standard-file-perm for config.toml: interface.md requires root:mimecast-forwarder 0640, since the file
#   may hold secrets; postinst sets the group once the user exists.
# - initial-upload-closes-no-bugs: the package is not uploaded to Debian, so there is no ITP bug to close.
lintian --fail-on error,warning --suppress-tags \
    maintainer-script-calls-systemctl,no-manual-page,non-standard-file-perm,initial-upload-closes-no-bugs "$deb"

echo "-- rpmlint"
# packaging/rpmlintrc lists the accepted findings with their reasons; rpmlint exits non-zero on anything else
# that is an error, and any remaining warning fails here too.
rpmlint -r packaging/rpmlintrc "$rpmfile" | tee target/rpmlint.txt
grep -q ' 0 errors, 0 warnings' target/rpmlint.txt || fail "rpmlint found errors or warnings"

echo "-- systemd unit"
systemd-analyze security --offline=yes --threshold=25 packaging/mimecast-forwarder.service | tail -n 3

echo "-- install the .deb"
dpkg -i "$deb"
systemd-analyze verify /usr/lib/systemd/system/mimecast-forwarder.service
getent passwd mimecast-forwarder >/dev/null || fail "no mimecast-forwarder user"
[ "$(stat -c '%U:%G %a' /etc/mimecast-forwarder/config.toml)" = "root:mimecast-forwarder 640" ] \
    || fail "config owner/mode is $(stat -c '%U:%G %a' /etc/mimecast-forwarder/config.toml)"
[ "$(stat -c '%U %a' /var/lib/mimecast-forwarder)" = "mimecast-forwarder 750" ] || fail "bad state directory"
# Without credentials the installed config is refused with 78, naming the key.
set +e
out=$(mimecast-forwarder check-config --config /etc/mimecast-forwarder/config.toml 2>&1); code=$?
set -e
[ "$code" = 78 ] && grep -q mimecast.client_id <<<"$out" || fail "check-config without credentials: $code $out"
# With credentials, as the service user, it is valid.
out=$(env MIMECAST_CLIENT_ID=ci MIMECAST_CLIENT_SECRET=ci-secret DD_API_KEY=ci-key \
    setpriv --reuid=mimecast-forwarder --regid=mimecast-forwarder --clear-groups \
    mimecast-forwarder check-config --config /etc/mimecast-forwarder/config.toml 2>&1) || fail "check-config: $out"
grep -q '\[redacted\]' <<<"$out" || fail "check-config did not print the redacted settings: $out"

echo "-- the README's set-up: secrets in files readable by the service's group"
sed -i -e 's|^# client_id = .*|client_id = "ci-client"|' \
    -e 's|^# client_secret_file = |client_secret_file = |' -e 's|^# api_key_file = |api_key_file = |' \
    /etc/mimecast-forwarder/config.toml
install -m 0640 -g mimecast-forwarder /dev/stdin /etc/mimecast-forwarder/client_secret <<< 'ci-secret-value'
install -m 0640 -g mimecast-forwarder /dev/stdin /etc/mimecast-forwarder/dd_api_key <<< 'ci-dd-key-value'
out=$(setpriv --reuid=mimecast-forwarder --regid=mimecast-forwarder --clear-groups \
    mimecast-forwarder check-config --config /etc/mimecast-forwarder/config.toml 2>&1) || fail "README set-up: $out"
! grep -q -e ci-secret-value -e ci-dd-key-value <<<"$out" || fail "a secret appeared in check-config output"

echo "-- upgrade keeps an edited config and the queue"
sed -i 's/^poll_interval_secs = 60/poll_interval_secs = 120/' /etc/mimecast-forwarder/config.toml
echo "queue" > /var/lib/mimecast-forwarder/queue.db
dpkg -i "$deb"
grep -q '^poll_interval_secs = 120' /etc/mimecast-forwarder/config.toml || fail "upgrade overwrote the config"
[ -s /var/lib/mimecast-forwarder/queue.db ] || fail "upgrade lost the queue"

echo "-- remove keeps config and queue; purge leaves nothing"
dpkg -r mimecast-forwarder
[ ! -e /usr/bin/mimecast-forwarder ] || fail "binary left after remove"
[ -e /etc/mimecast-forwarder/config.toml ] || fail "remove deleted the config"
dpkg -P mimecast-forwarder
for path in /etc/mimecast-forwarder /var/lib/mimecast-forwarder /usr/lib/systemd/system/mimecast-forwarder.service \
    /usr/share/doc/mimecast-forwarder; do
    [ ! -e "$path" ] || fail "$path left after purge"
done
! getent passwd mimecast-forwarder >/dev/null || fail "user left after purge"
! getent group mimecast-forwarder >/dev/null || fail "group left after purge"
echo "packages OK"
