# $1 is 0 on erase, 1 on upgrade: restart a running service after an upgrade.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ "$1" -ge 1 ]; then
        systemctl try-restart mimecast-forwarder.service >/dev/null 2>&1 || true
    fi
fi
exit 0
