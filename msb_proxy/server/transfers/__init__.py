"""File transfer: the SFTP subsystem and scp (both protocols), over the guest's own tools
where it has them and over the guest file helper (``files``) where it does not."""
