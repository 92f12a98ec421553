package vmagent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// addLocalRoute makes every address of prefix local to the host, as
// `ip route add local <prefix> dev lo` does: the host proxy binds its
// outbound listeners there, and containers reach them through their
// network's gateway, the host. added is false when the route was there
// already (another agent's, or a previous run's): it is then not this
// run's to remove.
func addLocalRoute(prefix netip.Prefix) (added bool, err error) {
	err = routeRequest(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, prefix)
	if errors.Is(err, syscall.EEXIST) {
		return false, nil
	}
	return err == nil, err
}

// delLocalRoute removes what addLocalRoute added.
func delLocalRoute(prefix netip.Prefix) error {
	return routeRequest(unix.RTM_DELROUTE, 0, prefix)
}

func routeRequest(typ uint16, flags uint16, prefix netip.Prefix) error {
	if !prefix.Addr().Is4() {
		return fmt.Errorf("%s: an IPv4 prefix is needed", prefix)
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return err
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	dst := prefix.Masked().Addr().As4()
	// nlmsghdr, rtmsg, then RTA_DST and RTA_OIF.
	body := []byte{
		unix.AF_INET, byte(prefix.Bits()), 0, 0, // family, dst_len, src_len, tos
		unix.RT_TABLE_LOCAL, unix.RTPROT_STATIC, unix.RT_SCOPE_HOST, unix.RTN_LOCAL, // table, protocol, scope, type
		0, 0, 0, 0, // flags
	}
	body = appendAttr(body, unix.RTA_DST, dst[:])
	oif := make([]byte, 4)
	binary.NativeEndian.PutUint32(oif, uint32(lo.Index))
	body = appendAttr(body, unix.RTA_OIF, oif)
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK|flags)
	binary.NativeEndian.PutUint32(msg[8:], 1) // seq
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if errno := int32(binary.NativeEndian.Uint32(m.Data[:4])); errno != 0 {
				return syscall.Errno(-errno)
			}
			return nil
		}
	}
	return errors.New("netlink: no acknowledgement")
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	hdr := make([]byte, unix.SizeofRtAttr)
	binary.NativeEndian.PutUint16(hdr[0:], uint16(l))
	binary.NativeEndian.PutUint16(hdr[2:], typ)
	b = append(append(b, hdr...), data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
