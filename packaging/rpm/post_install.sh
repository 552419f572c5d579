# $1 is 1 on install, 2 on upgrade.
install -d -o mimecast-forwarder -g mimecast-forwarder -m 0750 /var/lib/mimecast-forwarder
chown root:mimecast-forwarder /etc/mimecast-forwarder /etc/mimecast-forwarder/config.toml
chmod 0750 /etc/mimecast-forwarder
chmod 0640 /etc/mimecast-forwarder/config.toml
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" -eq 1 ]; then
    echo "mimecast-forwarder: set the credentials in /etc/mimecast-forwarder/config.toml, then: systemctl enable --now mimecast-forwarder"
fi
exit 0
