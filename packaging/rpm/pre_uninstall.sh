# $1 is 0 on erase, 1 on upgrade: stop and disable only on erase.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop mimecast-forwarder.service >/dev/null 2>&1 || true
    systemctl disable mimecast-forwarder.service >/dev/null 2>&1 || true
fi
exit 0
