#!/usr/bin/env bash
# Builds both packages (packaging/build.sh, which installs the pinned tools of packaging/versions.sh), checks their
# contents, their glibc floor and dependencies, lints them, checks the unit, then installs the .deb on this machine,
# runs the installed binary on the installed config, upgrades over an edited config, removes and purges it, and
# checks that nothing is left behind; then installs and erases the .rpm likewise. Run as root (CI is).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "ci-check: $*" >&2; exit 1; }
# shellcheck source=packaging/versions.sh
. packaging/versions.sh

echo "-- tools"
missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v rpmlint >/dev/null || missing+=(rpmlint)
command -v rpm >/dev/null || missing+=(rpm)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v objdump >/dev/null || missing+=(binutils)
command -v man >/dev/null || missing+=(man-db)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "-- build"
bash packaging/build.sh
deb=$(ls target/debian/mimecast-forwarder_*.deb | head -n1)
rpmfile=$(ls target/generate-rpm/mimecast-forwarder-*.rpm | head -n1)

echo "-- glibc floor (README promises $GLIBC_FLOOR): the binary inside the .deb"
mkdir -p target/ci-check
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/mimecast-forwarder >target/ci-check/mimecast-forwarder
newest=$(objdump -T target/ci-check/mimecast-forwarder | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)
echo "newest glibc symbol version: $newest"
[ "$(printf '%s\n%s\n' "$newest" "$GLIBC_FLOOR" | sort -V | tail -n1)" = "$GLIBC_FLOOR" ] \
    || fail "the binary needs glibc $newest, above the floor $GLIBC_FLOOR"
# Only glibc's own libraries, which every distribution has: anything else would need a package dependency.
needed=$(objdump -p target/ci-check/mimecast-forwarder | awk '/NEEDED/ { print $2 }' | sort | tr '\n' ' ')
echo "needed libraries: $needed"
[ "$needed" = "libc.so.6 libdl.so.2 libm.so.6 libpthread.so.0 " ] || fail "unexpected shared libraries: $needed"
chmod +x target/ci-check/mimecast-forwarder && target/ci-check/mimecast-forwarder --version
depends=$(dpkg-deb -f "$deb" Depends)
grep -qF "libc6 (>= $GLIBC_FLOOR)" <<<"$depends" || fail "the .deb depends on '$depends', not libc6 (>= $GLIBC_FLOOR)"
rpm_glibc=$(rpm -qpR "$rpmfile" | grep -o 'libc.so.6(GLIBC_[0-9.]*)' | grep -o '[0-9][0-9.]*[0-9]' | sort -V | tail -n1)
[ "$rpm_glibc" = "$GLIBC_FLOOR" ] || fail "the .rpm requires glibc $rpm_glibc, not $GLIBC_FLOOR"

echo "-- .deb contents"
deb_list=$(dpkg-deb -c "$deb")
echo "$deb_list"
for path in ./usr/bin/mimecast-forwarder ./etc/mimecast-forwarder/config.toml \
    ./usr/lib/systemd/system/mimecast-forwarder.service ./usr/share/doc/mimecast-forwarder/README.md \
    ./usr/share/doc/mimecast-forwarder/copyright ./usr/share/man/man1/mimecast-forwarder.1.gz; do
    grep -q " $path\$" <<<"$deb_list" || fail "$path missing from the .deb"
done
# The synopsis is one line of at most 79 characters, not a description cut mid-sentence.
synopsis=$(dpkg-deb -f "$deb" Description | head -n1)
echo "synopsis: $synopsis"
[ ${#synopsis} -lt 80 ] || fail "the .deb synopsis is ${#synopsis} characters long"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
grep -qx /etc/mimecast-forwarder/config.toml <<<"$conffiles" || fail "config.toml is not a conffile"

echo "-- .rpm contents"
rpm_list=$(rpm -qlp "$rpmfile")
echo "$rpm_list"
for path in /usr/bin/mimecast-forwarder /etc/mimecast-forwarder/config.toml \
    /usr/lib/systemd/system/mimecast-forwarder.service /usr/share/doc/mimecast-forwarder/README.md \
    /usr/share/man/man1/mimecast-forwarder.1.gz; do
    grep -qx "$path" <<<"$rpm_list" || fail "$path missing from the .rpm"
done
grep -qx /etc/mimecast-forwarder/config.toml <<<"$(rpm -qp --configfiles "$rpmfile")" || fail "config.toml is not %config"
grep -q useradd <<<"$(rpm -qp --scripts "$rpmfile")" || fail "the .rpm does not create the user"

echo "-- lintian"
# Accepted warnings (lintian --fail-on error still fails on any error):
# - maintainer-script-calls-systemctl: deliberate; the scripts guard every call with /run/systemd/system
#   and we do not use debhelper, whose generated snippets would enable and start the unit on a fresh install.
# - non-standard-file-perm for config.toml: interface.md requires root:mimecast-forwarder 0640, since the file
#   may hold secrets; postinst sets the group once the user exists.
# - initial-upload-closes-no-bugs: the package is not uploaded to Debian, so there is no ITP bug to close.
lintian --fail-on error,warning --suppress-tags \
    maintainer-script-calls-systemctl,non-standard-file-perm,initial-upload-closes-no-bugs "$deb" \
    | tee target/ci-check/lintian.txt
! grep -q -e no-manual-page -e manpage target/ci-check/lintian.txt || fail "lintian finds fault with the man page"

echo "-- rpmlint"
# packaging/rpmlintrc lists the accepted findings with their reasons, packaging/rpmlint.toml the settings of
# Fedora and RHEL where this rpmlint's differ; rpmlint exits non-zero on anything else that is an error, and any
# remaining warning fails here too.
rpmlint -c packaging/rpmlint.toml -r packaging/rpmlintrc "$rpmfile" | tee target/rpmlint.txt
grep -q ' 0 errors, 0 warnings' target/rpmlint.txt || fail "rpmlint found errors or warnings"

echo "-- systemd unit"
systemd-analyze security --offline=yes --threshold=25 packaging/mimecast-forwarder.service | tail -n 3
for line in Type=notify NotifyAccess=main WatchdogSec=60s; do
    grep -qx "$line" packaging/mimecast-forwarder.service || fail "the unit lacks $line"
done

echo "-- install the .deb"
# A run that stopped part way on this machine may have left the package installed with an edited config: start
# from nothing, as a fresh machine does.
if dpkg-query -W mimecast-forwarder >/dev/null 2>&1; then
    dpkg -P mimecast-forwarder >/dev/null || fail "could not purge an earlier install"
fi
dpkg -i "$deb"
# verify exits non-zero on errors and prints warnings: any output at all fails.
verify=$(systemd-analyze verify /usr/lib/systemd/system/mimecast-forwarder.service 2>&1) \
    || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"
echo "systemd-analyze verify: no findings"
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

echo "-- the .rpm on this machine (rpm --nodeps: the dependencies are Red Hat's names): install, erase"
# dnf remove is rpm -e: the package's directories must not stay behind, except for what the admin left in them.
rpm -i --nodeps "$rpmfile" 2>&1 | grep -v -e 'RPM should not be used directly' -e 'assuming you know' || true
[ "$(stat -c '%U:%G %a' /etc/mimecast-forwarder/config.toml)" = "root:mimecast-forwarder 640" ] \
    || fail "rpm: config owner/mode is $(stat -c '%U:%G %a' /etc/mimecast-forwarder/config.toml)"
rpm -e mimecast-forwarder 2>&1 | grep -v -e 'RPM should not be used directly' -e 'assuming you know' || true
for path in /etc/mimecast-forwarder /var/lib/mimecast-forwarder /usr/share/doc/mimecast-forwarder \
    /usr/share/licenses/mimecast-forwarder /usr/share/man/man1/mimecast-forwarder.1.gz /usr/bin/mimecast-forwarder; do
    [ ! -e "$path" ] || fail "$path left after rpm -e"
done
rpm -i --nodeps "$rpmfile" 2>&1 | grep -v -e 'RPM should not be used directly' -e 'assuming you know' || true
sed -i 's/^poll_interval_secs = 60/poll_interval_secs = 120/' /etc/mimecast-forwarder/config.toml
rpm -e mimecast-forwarder 2>&1 | grep -v -e 'RPM should not be used directly' -e 'assuming you know' || true
[ -e /etc/mimecast-forwarder/config.toml.rpmsave ] || fail "rpm -e did not keep the edited config as .rpmsave"
# RPM keeps the user (README); this machine drops it again.
rm -rf /etc/mimecast-forwarder
userdel mimecast-forwarder
getent group mimecast-forwarder >/dev/null && groupdel mimecast-forwarder
echo "packages OK"
