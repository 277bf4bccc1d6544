"""Make the certificates of a cross-cluster federation (Nebula-I): one CA, and a certificate per cluster.

    python tools/make_certs.py --out certs --clusters english code

writes certs/ca.pem (give it to every cluster), certs/<cluster>.pem and certs/<cluster>.key (keep the key on
that cluster's leader). Every certificate is good for both ends of a mutual-TLS link (serverAuth and
clientAuth). Point Distributed.cross_cluster.cert / key / ca_cert at them. The CA key (ca.key) signs new
clusters in later; keep it offline.
"""
import argparse
import datetime
import json
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppzoo federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path):
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _write_cert(cert, path):
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def make_certs(out, clusters, days=365, hosts=()):
    """Write ca.pem/ca.key and <cluster>.pem/.key for each cluster into `out`; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("ppzoo federation CA")).issuer_name(_name("ppzoo federation CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    written = {"ca_cert": os.path.join(out, "ca.pem"), "ca_key": os.path.join(out, "ca.key")}
    _write_cert(ca_cert, written["ca_cert"])
    _write_key(ca_key, written["ca_key"])
    alt_names = [x509.DNSName("localhost")]
    for host in hosts:
        import ipaddress

        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    for cluster in clusters:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(_name(cluster)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid_from).not_valid_after(valid_to)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        written[f"{cluster}_cert"] = os.path.join(out, f"{cluster}.pem")
        written[f"{cluster}_key"] = os.path.join(out, f"{cluster}.key")
        _write_cert(cert, written[f"{cluster}_cert"])
        _write_key(key, written[f"{cluster}_key"])
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the PEM files into")
    parser.add_argument("--clusters", nargs="+", required=True, help="one name per cluster, e.g. english code")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--hosts", nargs="*", default=(), help="leader host names or IPs to put in the certificates")
    args = parser.parse_args(argv)
    if len(set(args.clusters)) != len(args.clusters) or "ca" in args.clusters:
        parser.error("--clusters must be distinct names other than 'ca'")
    written = make_certs(args.out, args.clusters, args.days, args.hosts)
    for name, path in written.items():
        print(f"{name:>16}: {path}")
    print(json.dumps({"out": args.out, **written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
