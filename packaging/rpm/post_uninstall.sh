# $1 is 0 on erase, 1 on upgrade: restart a running service after an upgrade.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ "$1" -ge 1 ]; then
        systemctl try-restart mimecast-forwarder.service >/dev/null 2>&1 || true
    fi
fi
# On erase, the package's directories go too when nothing is left in them (the package cannot own them, see
# Cargo.toml). One that still holds something stays: an edited config kept as config.toml.rpmsave, secret files,
# the queue.
if [ "$1" -eq 0 ]; then
    for dir in /etc/mimecast-forwarder /var/lib/mimecast-forwarder /usr/share/doc/mimecast-forwarder/datadog/monitors \
        /usr/share/doc/mimecast-forwarder/datadog /usr/share/doc/mimecast-forwarder /usr/share/licenses/mimecast-forwarder; do
        rmdir "$dir" 2>/dev/null || true
    done
fi
exit 0
