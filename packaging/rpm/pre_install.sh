# Creates the service user before the files land, so the config can belong to its group.
getent group mimecast-forwarder >/dev/null || groupadd --system mimecast-forwarder
getent passwd mimecast-forwarder >/dev/null || useradd --system --gid mimecast-forwarder \
    --home-dir /var/lib/mimecast-forwarder --no-create-home --shell /sbin/nologin \
    --comment "mimecast-forwarder service" mimecast-forwarder
exit 0
