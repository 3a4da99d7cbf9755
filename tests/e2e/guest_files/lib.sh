# Helpers for guest test scripts; sourced (bash) before /e2e/test.sh.
# shellcheck shell=bash

# step NAME CMD [ARG...]: run CMD (stderr merged into stdout) between the markers the harness
# parses into a per-step result: "@@BEGIN NAME" ... "@@STEP NAME rc=N". Returns CMD's status.
step() {
    local name=$1 rc
    shift
    echo "@@BEGIN $name"
    "$@" 2>&1
    rc=$?
    echo "@@STEP $name rc=$rc"
    return "$rc"
}

# wait_disks N [SECONDS]: wait until at least N SCSI disks (/sys/block/sd*) exist.
wait_disks() {
    local want=$1 timeout=${2:-60} n=0 i
    for ((i = 0; i < timeout * 10; i++)); do
        n=$(find /sys/block -maxdepth 1 -name 'sd*' | wc -l)
        if [ "$n" -ge "$want" ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "only $n of $want disks appeared after ${timeout}s"
    return 1
}

# scsi_address DISK: "host:channel:target:lun" of /dev/sdX.
scsi_address() {
    basename "$(readlink "/sys/block/${1#/dev/}/device")"
}

# disk_for HOSTNUM_OR_STAR LUN: prints /dev/sdX whose SCSI LUN is LUN. The first argument
# picks the SCSI host by its index among virtio-scsi hosts in PCI order (0, 1...), or "*".
disk_for() {
    local want_host=$1 lun=$2 d addr host_index
    for d in /sys/block/sd*; do
        [ -e "$d" ] || continue
        addr=$(scsi_address "${d##*/}")
        if [ "${addr##*:}" != "$lun" ]; then
            continue
        fi
        host_index=$(scsi_host_index "${addr%%:*}")
        if [ "$want_host" = "*" ] || [ "$want_host" = "$host_index" ]; then
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    echo "no disk for host $want_host lun $lun" >&2
    return 1
}

# scsi_host_index HOSTNO: index of SCSI host HOSTNO among all SCSI hosts, in host number
# order (virtio-scsi hosts are registered in PCI slot order).
scsi_host_index() {
    local i=0 h
    for h in $(ls /sys/class/scsi_host | sed 's/^host//' | sort -n); do
        if [ "$h" = "$1" ]; then
            echo "$i"
            return 0
        fi
        i=$((i + 1))
    done
    return 1
}

# sg_for DISK: the /dev/sgN of /dev/sdX.
sg_for() {
    echo "/dev/$(ls "/sys/block/${1#/dev/}/device/scsi_generic")"
}

# odirect_roundtrip DISK FILE OFFSET_BYTES: write FILE at OFFSET with O_DIRECT, read it back
# with O_DIRECT and compare. FILE's size must be a multiple of 4096.
odirect_roundtrip() {
    local disk=$1 file=$2 offset=$3 size
    size=$(stat -c %s "$file")
    /usr/bin/dd if="$file" of="$disk" bs=4096 oflag=direct,seek_bytes seek="$offset" \
        conv=notrunc,fsync status=none || return 1
    /usr/bin/dd if="$disk" of=/tmp/readback bs=4096 iflag=direct,skip_bytes,count_bytes \
        skip="$offset" count="$size" status=none || return 1
    cmp "$file" /tmp/readback && echo "read back $size bytes identical"
}

# ext4_cycle DISK: mkfs.ext4, mount, write and check files, unmount, e2fsck -f.
ext4_cycle() {
    local disk=$1 i
    mkfs.ext4 -F -q "$disk" || return 1
    mkdir -p /mnt/e2e
    mount -t ext4 "$disk" /mnt/e2e || return 1
    for i in 1 2 3 4; do
        /usr/bin/dd if=/dev/urandom of="/mnt/e2e/file$i" bs=64k count=16 status=none || return 1
    done
    sha256sum /mnt/e2e/file* > /tmp/sums
    sync
    umount /mnt/e2e || return 1
    mount -t ext4 -o ro "$disk" /mnt/e2e || return 1
    sha256sum -c /tmp/sums || return 1
    umount /mnt/e2e || return 1
    e2fsck -f -n "$disk"
}

# read_compare DISK FILE OFFSET_BYTES: read FILE's size from DISK at OFFSET with O_DIRECT
# and compare with FILE.
read_compare() {
    local disk=$1 file=$2 offset=$3 size
    size=$(stat -c %s "$file")
    /usr/bin/dd if="$disk" of=/tmp/readback bs=4096 iflag=direct,skip_bytes,count_bytes \
        skip="$offset" count="$size" status=none || return 1
    cmp "$file" /tmp/readback && echo "read $size bytes identical"
}

# reads_zero DISK BYTES: the first BYTES of DISK (read with O_DIRECT) are all zero.
reads_zero() {
    local disk=$1 size=$2
    /usr/bin/dd if="$disk" of=/tmp/readback bs=4096 iflag=direct,count_bytes count="$size" \
        status=none || return 1
    cmp -n "$size" /tmp/readback /dev/zero && echo "first $size bytes read as zeros"
}

# disk_info DISK: key=value lines describing how the guest kernel sees DISK.
disk_info() {
    local name=${1#/dev/} addr
    addr=$(scsi_address "$name")
    echo "address=$addr"
    echo "size_bytes=$(blockdev --getsize64 "/dev/$name")"
    echo "logical_block_size=$(cat "/sys/block/$name/queue/logical_block_size")"
    echo "read_only=$(cat "/sys/block/$name/ro")"
    echo "rotational=$(cat "/sys/block/$name/queue/rotational")"
    echo "cache_type=$(cat "/sys/class/scsi_disk/$addr/cache_type" | tr ' ' _)"
    echo "hw_queues=$(ls "/sys/block/$name/mq" | wc -l)"
    echo "discard_max_bytes=$(cat "/sys/block/$name/queue/discard_max_bytes")"
    echo "vendor=$(tr -d ' ' < "/sys/block/$name/device/vendor")"
}
